"""`parallel=fsdp`: FSDP2 over every parameter, experts included (gathered every step)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.distributed.tensor import DTensor

from collectives.placement import Topology
from fssdp.config import ParallelConfig
from fssdp.dense import local_slices, shard_dense
from fssdp.precision import compute_dtype, fsdp_policy
from fssdp.strategies.base import LocalMetrics, Parallelized
from fssdp.strategies.registry import register
from models.common.experts import ExpertBank


@register("fsdp")
class FSDPParallel(Parallelized):
    def __init__(
        self, model: nn.Module, cfg: ParallelConfig, topology: Topology, units: list[nn.Module]
    ) -> None:
        super().__init__(model, cfg, topology)
        self.compute_dtype = compute_dtype()
        self.mixed_precision = self.compute_dtype is not None
        shard_dense(model, units, mp_policy=fsdp_policy(self.compute_dtype))
        self._bank_params = {
            id(p) for b in self.banks.values() for p in b.parameters(recurse=False)
        }

    def expert_ids(self, bank: ExpertBank) -> Sequence[int]:
        p = next(bank.parameters(recurse=False))
        if not isinstance(p, DTensor):
            return range(bank.num_experts)
        rows = local_slices(p)[0]
        return range(rows.start, rows.stop)

    def collect_step(self) -> LocalMetrics:
        out = super().collect_step()
        params = [p for _, p in self.named_optimizer_params()]
        full = lambda p: p.numel() * p.element_size()  # noqa: E731 - global bytes
        experts = sum(full(p) for p in params if id(p) in self._bank_params)
        dense = sum(full(p) for p in params if id(p) not in self._bank_params)
        share = (self.world - 1) / self.world
        # Per step: all-gather in forward, again in backward (resharded after forward), and a
        # reduce-scatter of the gradients; each sends (W−1)/W of the bytes per rank. Under
        # bf16 mixed precision the gathers move half the bytes, the reduce-scatter fp32.
        gathers = 2 * (0.5 if self.mixed_precision else 1.0)
        out.comm_bytes["dense"] = (gathers + 1) * share * (experts + dense)
        out.comm_bytes["fsdp_expert_gather"] = gathers * share * experts
        return out
