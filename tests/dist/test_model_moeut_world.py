"""MoEUT on two gloo ranks: loss and gradients equal the single-process ones (world-size
invariance of the entropy regulariser over all repeats)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.common.context import BatchReducer
from tests.support.harness import run_distributed
from tests.support.simulated_ranks import global_loss as _loss
from tests.unit.test_model_moeut import rel_err, tiny, tokens


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ws_worker(rank: int, world: int) -> tuple[Tensor, dict[str, Tensor]]:
    model = tiny(route_skew=0.5)
    x = tokens(4, 9, seed=3).chunk(world)[rank]
    reducer = BatchReducer(world, lambda t: (dist.all_reduce(t), t)[1])
    loss = _loss(model, x, reducer)
    loss.backward()
    return loss.detach(), _grads(model)


def test_world_size_invariance() -> None:
    model = tiny(route_skew=0.5)
    loss = _loss(model, tokens(4, 9, seed=3), BatchReducer())
    loss.backward()
    ref = _grads(model)
    (l0, g0), (l1, g1) = run_distributed(_ws_worker, 2)
    torch.testing.assert_close(l0, loss.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(l1, loss.detach(), rtol=1e-9, atol=0)
    assert g0.keys() == ref.keys() == g1.keys()
    for name, g in ref.items():
        assert rel_err((g0[name] + g1[name]) / 2, g) <= 1e-9, name


