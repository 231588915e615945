"""SUT on 1, 2 and 4 gloo ranks: loss and gradients equal the single-process ones (halting, ACT
and MI losses from global-batch statistics; the MI loss weighted by remaining mass by default,
or uniform)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.common.context import BatchReducer
from tests.support.harness import run_distributed
from tests.support.simulated_ranks import global_loss as _loss
from tests.unit.test_model_sut import mixed_halting, rel_err, tiny, tokens

CASES = {
    "reference": dict(),
    "uniform_state": dict(mi_weights="uniform", kv_source="state"),
}


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(rank: int, world: int, reducer: BatchReducer) -> dict[str, tuple[Tensor, dict]]:
    out = {}
    for name, overrides in CASES.items():
        model = tiny(route_skew=0.5, aux_mi=0.5, aux_act=0.1, **overrides)
        mixed_halting(model)
        x = tokens(4, 9, seed=3).chunk(world)[rank]
        loss = _loss(model, x, reducer)
        loss.backward()
        out[name] = (loss.detach(), _grads(model))
    return out


def _ws_worker(rank: int, world: int) -> dict[str, tuple[Tensor, dict]]:
    return _run(rank, world, BatchReducer(world, lambda t: (dist.all_reduce(t), t)[1]))


def test_world_size_invariance() -> None:
    ref = _run(0, 1, BatchReducer())
    for world in (1, 2, 4):
        ranks = run_distributed(_ws_worker, world)
        for name, (loss, g_ref) in ref.items():
            for got in ranks:
                torch.testing.assert_close(got[name][0], loss, rtol=1e-9, atol=0)
            assert all(got[name][1].keys() == g_ref.keys() for got in ranks)
            for p, g in g_ref.items():
                mean = sum(got[name][1][p] for got in ranks) / world
                assert rel_err(mean, g) <= 1e-9, (name, world, p)
