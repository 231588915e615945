"""`parallelize(model, cfg, units=…)`: the one place that applies a parallel strategy."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from collectives.placement import Topology
from fssdp.config import ParallelConfig
from fssdp.strategies.base import Parallelized
from fssdp.strategies.registry import strategy
from models.spec import default_fsdp_units


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    units: list[nn.Module] | None = None,
    ranks_per_node: int = 0,
) -> Parallelized:
    """Wrap `model` (on the meta device, or materialised) for `cfg.strategy` on the default
    process group. Call `.materialize(device, seed)` on the result before training.

    `units`: the modules FSDP2 wraps one by one (the model spec's `fsdp_units`; default: the
    children of the model's ModuleLists). `ranks_per_node` (the topology of the planner and
    dispatcher) comes from the launcher unless `cfg.ranks_per_node` overrides it; 0: one node.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rpn = cfg.ranks_per_node or ranks_per_node or world
    if world % rpn:
        raise ValueError(
            f"{world} ranks do not split into nodes of {rpn}: set parallel.ranks_per_node "
            "to a divisor of the world size"
        )
    cls = strategy(cfg.strategy)
    units = default_fsdp_units(model) if units is None else units
    return cls(model, cfg, Topology(world, rpn), units)
