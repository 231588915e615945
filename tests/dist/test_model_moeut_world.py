"""MoEUT on 1, 2 and 4 gloo ranks: loss and gradients equal the single-process ones (world-size
invariance of the entropy regulariser over all repeats, per sequence by default
[Note: per-sequence statistics] in models/common/losses.py, or pooled over the batch)."""

from __future__ import annotations

from models.common.context import BatchReducer
from tests.support.simulated_ranks import global_loss as _loss
from tests.support.world_invariance import (
    Result,
    all_reduce_reducer,
    assert_world_invariant,
    named_grads,
)
from tests.unit.test_model_moeut import tiny, tokens

CASES = {"sequence": dict(entropy_pooling="sequence"), "batch": dict(entropy_pooling="batch")}


def _run(rank: int, world: int, reducer: BatchReducer) -> Result:
    out = {}
    for name, overrides in CASES.items():
        # large coefficients: the regulariser's gradient must matter
        model = tiny(route_skew=0.5, aux_entropy=1.0, aux_att_entropy=0.5, **overrides)
        x = tokens(4, 9, seed=3).chunk(world)[rank]
        loss = _loss(model, x, reducer)
        loss.backward()
        out[name] = (loss.detach(), named_grads(model))
    return out


def _ws_worker(rank: int, world: int) -> Result:
    return _run(rank, world, all_reduce_reducer(world))


def test_world_size_invariance() -> None:
    ref = _run(0, 1, BatchReducer())
    assert abs(ref["sequence"][0] - ref["batch"][0]) > 1e-6  # the two forms differ here
    assert_world_invariant(_ws_worker, ref)
