"""`parallelize(model, mesh, cfg)`: the one place that applies a parallel strategy."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from fssdp.config import STRATEGIES, ParallelConfig
from fssdp.strategies.base import Parallelized


def parallelize(model: nn.Module, cfg: ParallelConfig, ranks_per_node: int = 0) -> Parallelized:
    """Wrap `model` for `cfg.strategy` on the default process group.

    `ranks_per_node` (topology for the planner and dispatcher) comes from the launcher unless
    `cfg.ranks_per_node` overrides it; 0 means one node.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rpn = cfg.ranks_per_node or ranks_per_node or world
    if world % rpn:
        raise ValueError(
            f"{world} ranks do not split into nodes of {rpn}: set parallel.ranks_per_node "
            "to a divisor of the world size"
        )
    if cfg.strategy == "none":
        if world != 1:
            raise ValueError(
                f"parallel=none runs on one process but the world size is {world}: "
                "use parallel=ddp|fsdp|ep|fssdp under torchrun"
            )
        return Parallelized(model)
    if cfg.strategy == "ddp":
        from fssdp.strategies.ddp import DDPParallel

        return DDPParallel(model)
    if cfg.strategy == "fsdp":
        from fssdp.strategies.fsdp import FSDPParallel

        return FSDPParallel(model)
    if cfg.strategy in ("fssdp", "ep"):
        from fssdp.strategies.fssdp import EPParallel, FSSDPParallel

        cls = FSSDPParallel if cfg.strategy == "fssdp" else EPParallel
        return cls(model, cfg, rpn)
    raise ValueError(
        f"parallel={cfg.strategy} is not available yet; choose one of {', '.join(STRATEGIES)}"
    )
