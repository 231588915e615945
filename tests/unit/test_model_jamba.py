"""Jamba: published sizes, causality, cached decoding, scans, aux loss, world-size invariance.

Legend: B batch, S sequence, V vocabulary, I inner width, N state size, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.common import losses
from models.common.context import BatchReducer, MoEContext
from models.common.mamba import selective_scan_chunked, selective_scan_sequential
from models.common.moe import MoEFeedForward
from models.jamba import Jamba, JambaConfig, active_parameters, is_attention_layer, is_moe_layer
from models.registry import build_model, preset
from tests.support.causality import assert_causal
from tests.support.simulated_ranks import global_loss, grads, two_rank_loss_and_grads
from tests.unit.test_router_losses import hf_load_balancing_loss


def _tiny(**overrides: object) -> Jamba:
    torch.manual_seed(0)
    return build_model(preset("jamba_tiny", **overrides)).to(torch.float64)


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_v0_1_parameter_counts() -> None:
    cfg = preset("jamba_v0_1")
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    active = active_parameters(model)
    assert abs(total / 52e9 - 1) < 0.03, total
    assert abs(active / 12e9 - 1) < 0.03, active
    kinds = [(is_attention_layer(cfg, i), is_moe_layer(cfg, i)) for i in range(cfg.n_layers)]
    assert sum(a for a, _ in kinds) == 4 and sum(m for _, m in kinds) == 16  # 1:7, every other


def test_tiny_layout() -> None:
    model = _tiny()
    attn = [i for i, layer in enumerate(model.layers) if layer.is_attention]
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoEFeedForward)]
    assert attn == [1] and moe == [1, 3]


def test_causality() -> None:
    model = _tiny()
    tokens = torch.randint(0, 256, (2, 12))
    assert_causal(model, tokens, 7)


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_cached_decoding_equals_full_forward(scan: str) -> None:
    model = _tiny(scan=scan, scan_chunk=3)
    tokens = torch.randint(0, 256, (2, 14))
    full = model(tokens)
    cache = model.new_cache()
    # prefill shorter than the conv window, then a multi-token step, then one token at a time
    pieces, start = [], 0
    for size in (2, 5, 1, 1, 1, 1, 1, 1, 1):
        pieces.append(model(tokens[:, start : start + size], cache=cache))
        start += size
    assert start == tokens.shape[1]
    assert _rel(torch.cat(pieces, dim=1), full) <= 1e-9


def _scan_inputs(S: int, I: int = 6, N: int = 4) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x, dt = r(2, S, I), F.softplus(r(2, S, I))  # large Δ: strong decays
    A = -torch.exp(r(I, N)) * 3
    return x, dt, A, r(2, S, N), r(2, S, N), r(I), r(2, I, N)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 32])
def test_sequential_scan_equals_chunked_scan(chunk: int) -> None:
    S = 13
    inputs = [t.requires_grad_() for t in _scan_inputs(S)]
    y_ref, h_ref = selective_scan_sequential(*inputs)
    y, h = selective_scan_chunked(*inputs, chunk=chunk)
    assert _rel(y, y_ref) <= 1e-9 and _rel(h, h_ref) <= 1e-9
    probe = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * probe).sum() + h_ref.sum(), inputs)
    g = torch.autograd.grad((y * probe).sum() + h.sum(), inputs)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) <= 1e-9


def test_switch_loss_is_about_two_at_init() -> None:
    torch.manual_seed(0)
    model = build_model(preset("jamba_tiny", num_experts=16, top_k=2))
    moe = next(layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEFeedForward))
    x_TD = model.layers[0].norm_ffn(torch.randn(4096, model.cfg.d_model))
    routing = moe.router(x_TD)
    reducer = BatchReducer()
    counts_E = losses.global_counts(routing, 16, reducer)
    assert abs(losses.switch_loss(routing, counts_E, reducer).item() - 2.0) < 0.1
    ctx = MoEContext()
    model(torch.randint(0, 256, (4, 32)), ctx)
    assert abs(ctx.aux_losses["switch"].item() / 0.001 - 2.0) < 0.1  # pooled over the layers


@pytest.mark.parametrize("pooling", ["pooled", "per_layer"])
def test_switch_loss_pools_all_layers_as_transformers(pooling: str) -> None:
    """Default: transformers' `load_balancing_loss_func` over the router logits of every MoE
    layer (transcribed in tests/unit/test_router_losses.py); per_layer: one loss per layer."""
    model = _tiny(aux_pooling=pooling, num_experts=6)
    moes = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEFeedForward)]
    seen: list[Tensor] = []
    for moe in moes:
        moe.router.logits = _record(moe.router.logits, seen)
    ctx = MoEContext()
    model(torch.randint(0, 256, (3, 10)), ctx)
    assert len(seen) == len(moes) == 2
    pooled = hf_load_balancing_loss(seen, 6, 2)
    per_layer = sum(hf_load_balancing_loss([lg], 6, 2) for lg in seen)
    want = pooled if pooling == "pooled" else per_layer
    assert abs(ctx.aux_losses["switch"].item() / (0.001 * want.item()) - 1) <= 1e-12
    assert abs(per_layer / pooled - 2) < 0.5 and abs(per_layer - pooled) > 1e-3


def _record(fn: Any, seen: list) -> Any:
    def wrapped(*args: Any) -> Any:
        seen.append(fn(*args))
        return seen[-1]

    return wrapped


def test_route_skew_skews_load() -> None:
    ctx = MoEContext()
    _tiny(route_skew=3.0)(torch.randint(0, 256, (2, 16)), ctx)
    for counts_E in ctx.expert_load.values():
        assert counts_E[0] > 4 * counts_E[-1] and counts_E.sum() == 2 * 16 * 2


# -- world-size invariance (two simulated ranks) --------------------------------------------


def test_world_size_invariance() -> None:
    model = _tiny(aux_z=0.01)
    tokens = torch.randint(0, 256, (4, 10))
    model.zero_grad()
    loss = global_loss(model, tokens, BatchReducer())
    loss.backward()
    ref = grads(model)
    ranks = two_rank_loss_and_grads(model, tokens)
    for rank_loss, _ in ranks:
        assert abs(rank_loss.item() / loss.item() - 1) <= 1e-9
    for g0, g1, g in zip(ranks[0][1], ranks[1][1], ref):
        assert ((g0 + g1) / 2 - g).abs().max() <= 1e-9 * max(g.abs().max().item(), 1e-12)


def test_learns() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(JambaConfig(), vocab_size=64)
    model = build_model(cfg)
    data = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = last = 0.0
    for step in range(30):
        loss = global_loss(model, data, BatchReducer())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first, last = (loss.item(), loss.item()) if step == 0 else (first, loss.item())
    assert last < 0.5 * first, (first, last)
