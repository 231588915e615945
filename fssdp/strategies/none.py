"""`parallel=none`: one process, every parameter local (the reference every strategy is
tested against)."""

from __future__ import annotations

from torch import nn

from collectives.placement import Topology
from fssdp.config import ParallelConfig
from fssdp.strategies.base import Parallelized
from fssdp.strategies.registry import register


@register("none")
class NoneParallel(Parallelized):
    def __init__(
        self, model: nn.Module, cfg: ParallelConfig, topology: Topology, units: list[nn.Module]
    ) -> None:
        if topology.world_size != 1:
            raise ValueError(
                f"parallel=none runs on one process but the world size is {topology.world_size}:"
                " use parallel=ddp|fsdp|ep|fssdp under torchrun"
            )
        super().__init__(model, cfg, topology)
