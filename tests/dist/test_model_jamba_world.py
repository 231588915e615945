"""The pooled Switch loss in a model, on 1, 2 and 4 gloo ranks: Jamba (pooled by default, as
transformers) and GPT-MoE with `aux_pooling=pooled` give the single-process loss and gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.common.context import BatchReducer
from models.registry import build_model, preset
from tests.support.harness import run_distributed
from tests.support.simulated_ranks import global_loss

CASES = {
    "jamba": ("jamba_tiny", dict(route_skew=0.5, aux_switch=0.1)),
    "gpt_moe_pooled": ("gpt_moe_tiny", dict(route_skew=0.5, aux_switch=0.1, aux_pooling="pooled")),
}


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(rank: int, world: int, reducer: BatchReducer) -> dict[str, tuple[Tensor, dict]]:
    out = {}
    x = torch.randint(0, 256, (4, 11), generator=torch.Generator().manual_seed(2))
    for name, (model_name, overrides) in CASES.items():
        model = build_model(preset(model_name, **overrides), dtype=torch.float64)
        loss = global_loss(model, x.chunk(world)[rank], reducer)
        loss.backward()
        out[name] = (loss.detach(), _grads(model))
    return out


def _ws_worker(rank: int, world: int) -> dict[str, tuple[Tensor, dict]]:
    return _run(rank, world, BatchReducer(world, lambda t: (dist.all_reduce(t), t)[1]))


def test_pooled_switch_loss_is_world_size_invariant() -> None:
    ref = _run(0, 1, BatchReducer())
    for world in (1, 2, 4):
        ranks = run_distributed(_ws_worker, world)
        for name, (loss, g_ref) in ref.items():
            for got in ranks:
                torch.testing.assert_close(got[name][0], loss, rtol=1e-9, atol=0)
            for p, g in g_ref.items():
                mean = sum(got[name][1][p] for got in ranks) / world
                assert _rel(mean, g) <= 1e-9, (name, world, p)
