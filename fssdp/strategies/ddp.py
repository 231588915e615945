"""`parallel=ddp`: every rank holds every parameter; gradients all-reduced (averaged)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from collectives.placement import Topology
from fssdp.config import ParallelConfig
from fssdp.strategies.base import LocalMetrics, Parallelized, _bytes
from fssdp.strategies.registry import register


@register("ddp")
class DDPParallel(Parallelized):
    def __init__(
        self, model: nn.Module, cfg: ParallelConfig, topology: Topology, units: list[nn.Module]
    ) -> None:
        super().__init__(model, cfg, topology)

    def _after_materialize(self) -> None:
        # Experts that receive no tokens on a rank get no gradient there: DDP must look for
        # unused parameters every step rather than hang waiting for them.
        self.module = DistributedDataParallel(self.model, find_unused_parameters=True)

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """[Note: sync per step]: no all-reduce before the last micro-batch's backward."""
        if last or not isinstance(self.module, DistributedDataParallel):
            yield
            return
        with self.module.no_sync():
            yield

    def collect_step(self) -> LocalMetrics:
        out = super().collect_step()
        grad_bytes = sum(_bytes(p) for _, p in self.named_optimizer_params())
        # Ring all-reduce: each rank sends 2(W−1)/W of the gradient bytes.
        out.comm_bytes["dense"] = 2 * (self.world - 1) / self.world * grad_bytes
        return out
