"""What EP and FSSDP share: experts sharded whole across ranks as registered parameters of
their owned rows ([Note: expert parameters] in fssdp/expert_params.py), dense parameters under
FSDP2, and the token exchange's process group and counters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from collectives.placement import Topology
from fssdp.config import ParallelConfig
from fssdp.counts import CountExchange
from fssdp.dense import shard_dense
from fssdp.dispatch import CallStats, Exchange
from fssdp.expert_params import shard_bank
from fssdp.groups import side_groups
from fssdp.phases import NULL_TIMER, PhaseTimer
from fssdp.precision import compute_dtype, fsdp_policy
from fssdp.strategies.base import LocalMetrics, Parallelized
from models.common.experts import ExpertBank


class ExpertSharded(Parallelized):
    """Base of `ep` and `fssdp` (not a strategy itself)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: ParallelConfig,
        topology: Topology,
        units: list[nn.Module],
        owners: dict[str, list[int]],
    ) -> None:
        super().__init__(model, cfg, topology)
        # bf16: FSDP2's policy for the dense part, bf16 expert compute ([Note: mixed precision
        # of experts] in fssdp/precision.py)
        self.compute_dtype = compute_dtype()
        self.mixed_precision = self.compute_dtype is not None
        if not self.banks:
            raise ValueError(f"parallel={self.name}: the model has no expert bank")
        # Sparse collectives and token dispatch get groups of their own
        # ([Note: three process groups] in fssdp/executor.py).
        self.sparse_group, self.dispatch_group = side_groups()
        self.owner = owners  # bank -> owner rank per expert (P0)
        for name, bank in self.banks.items():
            shard_bank(bank, [e for e, r in enumerate(owners[name]) if r == self.rank])
        self.exchanges = {name: self._exchange(name) for name in self.banks}
        # Each bank's per-call count matrices; the model may announce a call's routing early
        # ([Note: announced routing] in fssdp/counts.py).
        self.count_exchanges = {
            name: CountExchange(self.exchanges[name], bank.num_experts)
            for name, bank in self.banks.items()
        }
        for name, bank in self.banks.items():
            bank.announcer = self.count_exchanges[name].announce
        experts = self.sharded_params()
        ids = {id(p) for p in experts}
        self._dense_bytes = sum(
            p.numel() * p.element_size() for p in model.parameters() if id(p) not in ids
        )
        shard_dense(model, units, ignored=experts, mp_policy=fsdp_policy(self.compute_dtype))

    def _exchange(self, name: str) -> Exchange:
        return Exchange(
            self.dispatch_group,
            self.rank,
            self.world,
            self.cfg.timeout_s,
            name,
            NULL_TIMER,
            CallStats(),
        )

    def sharded_params(self) -> list[Tensor]:
        # Looked up each time: `to_empty` replaces meta parameters by new Parameter objects.
        return [p for b in self.banks.values() for p in b.parameters(recurse=False)]

    def expert_ids(self, bank: ExpertBank) -> Sequence[int]:
        assert bank.expert_ids is not None, f"bank {bank.bank_name} is not sharded"
        return bank.expert_ids

    def instrument(self, timer: PhaseTimer) -> None:
        super().instrument(timer)
        for ex in self.exchanges.values():
            ex.phases = timer

    def _dense_comm(self) -> float:
        # FSDP2 on the dense parameters: all-gather forward and backward, reduce-scatter; each
        # sends (W−1)/W of the bytes per rank (an estimate, not counted on the wire); bf16
        # gathers move half the bytes, the reduce-scatter stays fp32.
        gathers = 2 * (0.5 if self.mixed_precision else 1.0)
        return (gathers + 1) * (self.world - 1) / self.world * self._dense_bytes

    def collect_step(self) -> LocalMetrics:
        out = super().collect_step()
        out.comm_bytes["dense"] = self._dense_comm()
        return out

    def owner_tensor(self, name: str) -> Tensor:
        return torch.tensor(self.owner[name], dtype=torch.long)
