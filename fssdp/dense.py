"""Dense parameters are sharded with PyTorch FSDP2 (`fully_shard`), unit by unit."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def shard_dense(
    model: nn.Module,
    units: list[nn.Module],
    ignored: Iterable[nn.Parameter] = (),
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """fully_shard every unit that has parameters FSDP2 should manage, then the root (which
    takes the rest). `ignored` parameters (sharded experts) stay plain and registered."""
    skip = set(ignored)
    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for unit in units:
        if any(p not in skip for p in unit.parameters()):
            fully_shard(unit, ignored_params=skip or None, **kw)
    fully_shard(model, ignored_params=skip or None, **kw)
    return model


def local_slices(t: DTensor) -> tuple[slice, ...]:
    """The part of the global tensor this rank's local shard holds (FSDP2: Shard(0))."""
    for pl in t.placements:
        if not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)):
            raise ValueError(f"tensor with placement {pl}: expected Shard(0) or Replicate")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def set_dense_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's gradient sync on or off for every unit of `model` (no-op when not FSDP2)
    ([Note: sync per step] in fssdp/strategies/base.py)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync, recurse=True)
