"""UMoE: sizes, causality, cached decoding, the shared bank's two calls, world-size invariance.

Legend: B batch, S sequence, T tokens, D model width, E experts, F expert hidden, R query rank,
Q query/key width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from models.common.context import BatchReducer, MoEContext
from models.common.experts import ExpertBank
from models.registry import build_model, preset
from models.umoe import UMoE, UMoEConfig
from tests.support.causality import assert_causal
from tests.support.simulated_ranks import global_loss, grads, lm_loss, two_rank_loss_and_grads


def _tiny(**overrides: object) -> UMoE:
    torch.manual_seed(0)
    return build_model(preset("umoe_tiny", **overrides)).to(torch.float64)


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _expected_parameters(cfg: UMoEConfig) -> int:
    """Closed form: bank + low-rank/residual/shared queries + key + 2 shared experts + routers
    + the rank-r query norm (reference code: one weight vector of width r per layer)."""
    d, E, F_, R, Q = cfg.d_model, cfg.num_experts, cfg.expert_hidden, cfg.q_rank, cfg.d_qk
    per_layer = 2 * E * d * F_ + E * (d * R + R * Q) + 3 * d * Q + 2 * 2 * d * F_ + 2 * E * d
    per_layer += R if cfg.q_norm else 0
    return cfg.n_layers * (per_layer + 2 * d) + 2 * cfg.vocab_size * d + d


def test_parameter_counts() -> None:
    for name, q_norm in (("umoe_tiny", True), ("umoe_small", True), ("umoe_tiny", False)):
        cfg = preset(name, q_norm=q_norm)
        model = build_model(cfg, device="meta")
        assert sum(p.numel() for p in model.parameters()) == _expected_parameters(cfg)
    # umoe_small: 540.5M, of which 453M in the 12 shared banks
    assert abs(_expected_parameters(preset("umoe_small")) / 540.5e6 - 1) < 0.001


def _rms(u: list[float], eps: float) -> list[float]:
    scale = (sum(x * x for x in u) / len(u) + eps) ** -0.5
    return [x * scale for x in u]


@pytest.mark.parametrize("q_norm", [True, False])
def test_routed_query_has_the_reference_rank_norm(q_norm: bool) -> None:
    """q_{t,e} = B_eᵀ·(g ⊙ RMSNorm(A_eᵀ·x)) + W_qres·x (the reference's `q_a_layernorm`), by hand
    in plain floats; without the norm (q_norm=false) B_eᵀ·(A_eᵀ·x) + W_qres·x."""
    att = _tiny(q_norm=q_norm).layers[0].att
    if q_norm:
        with torch.no_grad():  # a learned gain: make it matter
            att.q_norm.weight.copy_(torch.linspace(0.5, 2.0, att.q_a.shape[2]))
    g = torch.Generator().manual_seed(3)
    x_TD = torch.randn(3, 64, generator=g, dtype=torch.float64)
    expert_TK = torch.tensor([[5, 1], [0, 7], [2, 2]])
    got_TKQ = att.routed_queries(x_TD, expert_TK)
    eps = att.q_norm.eps if q_norm else 0.0
    for t in range(3):
        x = x_TD[t].tolist()
        res = [sum(w * v for w, v in zip(row, x)) for row in att.q_res.weight.tolist()]
        for k, e in enumerate(expert_TK[t].tolist()):
            A, Bm = att.q_a[e].tolist(), att.q_b[e].tolist()  # [D, R], [R, Q]
            u = [sum(x[i] * A[i][r] for i in range(64)) for r in range(len(A[0]))]
            if q_norm:
                u = [v * w for v, w in zip(_rms(u, eps), att.q_norm.weight.tolist())]
            q = [sum(u[r] * Bm[r][j] for r in range(len(u))) + res[j] for j in range(len(res))]
            assert _rel(got_TKQ[t, k], torch.tensor(q, dtype=torch.float64)) <= 1e-12


def test_causality() -> None:
    model = _tiny()
    tokens = torch.randint(0, 256, (2, 12))
    assert_causal(model, tokens, 6)


def test_cached_decoding_equals_full_forward() -> None:
    model = _tiny()
    tokens = torch.randint(0, 256, (2, 12))
    full = model(tokens)
    cache = model.new_cache()
    pieces, start = [], 0
    for size in (3, 4, 1, 1, 1, 1, 1):
        pieces.append(model(tokens[:, start : start + size], cache=cache))
        start += size
    assert start == tokens.shape[1]
    assert _rel(torch.cat(pieces, dim=1), full) <= 1e-9
    # the cache holds the RoPE'd shared key and the normalised inputs (the values)
    assert cache[0].k.shape == (2, 1, 12, 16) and cache[0].v.shape == (2, 1, 12, 64)


def test_shared_bank_called_twice_per_layer_and_gradients_accumulate() -> None:
    model = _tiny()
    cfg = model.cfg
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    assert len(banks) == cfg.n_layers
    for bank in banks:  # the low-rank query factors are dense parameters, not bank weights
        assert set(bank.stacked()) == {"w_in", "w_out"}
    calls: list[tuple[str, int, dict[str, Tensor]]] = []

    def executor(bank: ExpertBank, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        # a private leaf copy of the weights per call, to see each call's gradient separately
        w = {k: v.detach().clone().requires_grad_() for k, v in bank.stacked().items()}
        calls.append((bank.bank_name, x_ND.shape[0], w))
        return bank.compute(w, x_ND, expert_N)

    tokens = torch.randint(0, 256, (2, 9))
    T = tokens[:, :-1].numel()
    for bank in banks:
        bank.executor = executor
    ctx = MoEContext()
    lm_loss(model, tokens, ctx).backward()
    assert [(n, rows) for n, rows, _ in calls] == [
        (b.bank_name, T * k) for b in banks for k in (cfg.top_k_att, cfg.top_k_ffn)
    ]
    for bank in banks:  # the recorded load sums both sub-layers
        assert ctx.expert_load[bank.bank_name].sum() == T * (cfg.top_k_att + cfg.top_k_ffn)
    for bank in banks:
        bank.executor = None
    model.zero_grad()
    lm_loss(model, tokens, MoEContext()).backward()
    for i, bank in enumerate(banks):
        (_, _, w_att), (_, _, w_ffn) = calls[2 * i], calls[2 * i + 1]
        for name, p in bank.stacked().items():
            assert w_att[name].grad.abs().max() > 0 and w_ffn[name].grad.abs().max() > 0
            assert _rel(w_att[name].grad + w_ffn[name].grad, p.grad) <= 1e-12


def test_route_skew_skews_both_routers() -> None:
    ctx = MoEContext()
    _tiny(route_skew=3.0)(torch.randint(0, 256, (2, 16)), ctx)
    for counts_E in ctx.expert_load.values():
        assert counts_E[0] > 2 * counts_E[-1]
    # with k_att + k_ffn = 6 of 8 experts the top experts saturate: check the attention router
    model = _tiny(route_skew=3.0)
    routing = model.layers[0].att.router(torch.randn(64, 64, dtype=torch.float64))
    assert (routing.expert_TK == 0).any(-1).all() and not (routing.expert_TK == 7).any()


def test_sequence_balance_loss_recorded() -> None:
    ctx = MoEContext()
    _tiny()(torch.randint(0, 256, (2, 16)), ctx)
    # Σ_e f_e·P_e ≈ 1 per router at near-uniform init; 2 routers per layer, α = 0.001
    assert set(ctx.aux_losses) == {"seq_balance"}
    assert abs(ctx.aux_losses["seq_balance"].item() / (0.001 * 2 * 2) - 1) < 0.1


# -- world-size invariance (two simulated ranks) --------------------------------------------


def test_world_size_invariance() -> None:
    model = _tiny(aux_seq_balance=0.1)  # large enough for the aux gradient to matter
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
    model = build_model(dataclasses.replace(UMoEConfig(), vocab_size=64))
    data = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses_seen = []
    for _ in range(30):
        loss = global_loss(model, data, BatchReducer())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses_seen.append(loss.item())
    assert losses_seen[-1] < 0.5 * losses_seen[0], losses_seen
