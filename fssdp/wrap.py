"""`parallelize(model, mesh, cfg)`: the one place that applies a parallel strategy."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from fssdp.config import STRATEGIES, ParallelConfig
from fssdp.strategies.base import Parallelized


def parallelize(model: nn.Module, cfg: ParallelConfig, **runtime: object) -> Parallelized:
    """Wrap `model` for `cfg.strategy` on the default process group."""
    world = dist.get_world_size() if dist.is_initialized() else 1
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
    raise ValueError(
        f"parallel={cfg.strategy} is not available yet; choose one of {', '.join(STRATEGIES)}"
    )
