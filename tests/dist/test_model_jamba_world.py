"""The pooled Switch loss in a model, on 1, 2 and 4 gloo ranks: Jamba (pooled by default, as
transformers) and GPT-MoE with `aux_pooling=pooled` give the single-process loss and gradients."""

from __future__ import annotations

import torch

from models.common.context import BatchReducer
from models.registry import build_model, preset
from tests.support.simulated_ranks import global_loss
from tests.support.world_invariance import (
    Result,
    all_reduce_reducer,
    assert_world_invariant,
    named_grads,
)

CASES = {
    "jamba": ("jamba_tiny", dict(route_skew=0.5, aux_switch=0.1)),
    "gpt_moe_pooled": ("gpt_moe_tiny", dict(route_skew=0.5, aux_switch=0.1, aux_pooling="pooled")),
}


def _run(rank: int, world: int, reducer: BatchReducer) -> Result:
    out = {}
    x = torch.randint(0, 256, (4, 11), generator=torch.Generator().manual_seed(2))
    for name, (model_name, overrides) in CASES.items():
        model = build_model(preset(model_name, **overrides), dtype=torch.float64)
        loss = global_loss(model, x.chunk(world)[rank], reducer)
        loss.backward()
        out[name] = (loss.detach(), named_grads(model))
    return out


def _ws_worker(rank: int, world: int) -> Result:
    return _run(rank, world, all_reduce_reducer(world))


def test_pooled_switch_loss_is_world_size_invariant() -> None:
    ref = _run(0, 1, BatchReducer())
    assert_world_invariant(_ws_worker, ref, same_keys=False)
