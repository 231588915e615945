"""SUT on 1, 2 and 4 gloo ranks: loss and gradients equal the single-process ones (halting, ACT
and MI losses from global-batch statistics; the MI loss weighted by remaining mass by default,
or uniform)."""

from __future__ import annotations

from models.common.context import BatchReducer
from tests.support.simulated_ranks import global_loss as _loss
from tests.support.world_invariance import (
    Result,
    all_reduce_reducer,
    assert_world_invariant,
    named_grads,
)
from tests.unit.test_model_sut import mixed_halting, tiny, tokens

CASES = {
    "reference": dict(),
    "uniform_state": dict(mi_weights="uniform", kv_source="state"),
}


def _run(rank: int, world: int, reducer: BatchReducer) -> Result:
    out = {}
    for name, overrides in CASES.items():
        model = tiny(route_skew=0.5, aux_mi=0.5, aux_act=0.1, **overrides)
        mixed_halting(model)
        x = tokens(4, 9, seed=3).chunk(world)[rank]
        loss = _loss(model, x, reducer)
        loss.backward()
        out[name] = (loss.detach(), named_grads(model))
    return out


def _ws_worker(rank: int, world: int) -> Result:
    return _run(rank, world, all_reduce_reducer(world))


def test_world_size_invariance() -> None:
    ref = _run(0, 1, BatchReducer())
    assert_world_invariant(_ws_worker, ref)
