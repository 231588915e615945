"""What the model world-size tests share (tests/dist/test_model_*_world.py): every case's loss
and gradients on W gloo ranks against one process.

A test's `_run(rank, world, reducer)` returns {case: (loss, named gradients)}; its module-level
worker calls `_run(rank, world, all_reduce_reducer(world))` (spawned ranks need an importable
function), and `assert_world_invariant` compares every world with the single-process `ref`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.common.context import BatchReducer
from tests.support.harness import run_distributed

Result = dict[str, tuple[Tensor, dict[str, Tensor]]]


def named_grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def all_reduce_reducer(world: int) -> BatchReducer:
    return BatchReducer(world, lambda t: (dist.all_reduce(t), t)[1])


def max_rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_world_invariant(
    worker: Callable[[int, int], Any],
    ref: Result,
    worlds: Sequence[int] = (1, 2, 4),
    *,
    same_keys: bool = True,
) -> None:
    """On every world: each rank's loss equals ref's (1e-9), and the mean over ranks of the
    gradients equals ref's (max relative error 1e-9); `same_keys`: every rank has ref's keys."""
    for world in worlds:
        ranks = run_distributed(worker, world)
        for name, (loss, g_ref) in ref.items():
            for got in ranks:
                torch.testing.assert_close(got[name][0], loss, rtol=1e-9, atol=0)
            if same_keys:
                assert all(got[name][1].keys() == g_ref.keys() for got in ranks)
            for p, g in g_ref.items():
                mean = sum(got[name][1][p] for got in ranks) / world
                assert max_rel(mean, g) <= 1e-9, (name, world, p)
