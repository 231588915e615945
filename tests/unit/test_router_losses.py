"""Routers and auxiliary losses in one process (world-size invariance: tests/dist)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.common import losses
from models.common.context import BatchReducer
from models.common.router import TopKRouter, route, skew_bias


def test_switch_loss_is_k_at_uniform_routing() -> None:
    torch.manual_seed(0)
    router = TopKRouter(32, 16, 2, std=1e-4).double()
    r = router(torch.randn(4096, 32, dtype=torch.float64))
    val = losses.switch_loss(r, r.counts(16), BatchReducer())
    assert abs(val.item() - 2.0) < 0.05, val.item()


def test_switch_loss_punishes_collapse() -> None:
    logits = torch.zeros(100, 8, dtype=torch.float64)
    logits[:, 0] = 10.0
    r = route(logits, 2)
    assert losses.switch_loss(r, r.counts(8), BatchReducer()).item() > 4.0


def test_router_variants() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    soft = route(logits, 2, "softmax", renormalize=False)
    renorm = route(logits, 2, "softmax", renormalize=True)
    sig = route(logits, 2, "sigmoid")
    assert soft.expert_TK.tolist() == [[0, 1]]
    assert soft.gate_TK.sum() < 1.0 and abs(renorm.gate_TK.sum().item() - 1.0) < 1e-12
    torch.testing.assert_close(sig.gate_TK, torch.sigmoid(torch.tensor([[2.0, 1.0]]).double()))


def test_route_skew_is_zipf() -> None:
    b = skew_bias(4, 1.0)
    p = torch.softmax(b, 0)
    expected = torch.tensor([1 / (e + 1) for e in range(4)], dtype=torch.float64)
    torch.testing.assert_close(p, expected / expected.sum())


def test_z_loss_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r = route(logits, 1)
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert abs(losses.z_loss(r, BatchReducer()).item() - expected) < 1e-12






def test_mi_loss_ranks_routing() -> None:
    red = BatchReducer()
    confident_balanced = torch.eye(4, dtype=torch.float64).repeat(8, 1) * 20
    uniform = torch.zeros(32, 4, dtype=torch.float64)
    collapsed = torch.zeros(32, 4, dtype=torch.float64)
    collapsed[:, 0] = 20
    mi = [
        losses.mutual_information_loss(lg, red).item()
        for lg in (confident_balanced, uniform, collapsed)
    ]
    assert mi[0] < mi[1] and mi[0] < mi[2], mi


def _logits(*probs: tuple[float, ...]) -> torch.Tensor:
    """Logits whose softmax is exactly each row of `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log()


def _h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p)


def test_sequence_entropy_regularizer_hand_example() -> None:
    """MoEUT's reference form: −H of each sequence's mean softmax, then the mean over sequences;
    pooling the batch's rows into one mean (the old form) gives another value."""
    seq1, seq2 = _logits((0.8, 0.2), (0.4, 0.6)), _logits((0.5, 0.5), (0.5, 0.5))
    l_BXE = torch.stack([seq1, seq2])  # [2 sequences, 2 rows, 2 experts]
    want = -(_h(0.6, 0.4) + _h(0.5, 0.5)) / 2  # p̄ = (0.6, 0.4) and (0.5, 0.5)
    got = losses.sequence_entropy_regularizer(l_BXE, BatchReducer())
    assert abs(got.item() - want) <= 1e-15
    pooled = losses.entropy_regularizer(l_BXE.reshape(4, 2), BatchReducer())
    assert abs(pooled.item() + _h(0.55, 0.45)) <= 1e-15 and abs(pooled.item() - want) > 4e-3
    # extra dims (attention heads) are averaged per sequence: two copies change nothing
    heads = losses.sequence_entropy_regularizer(torch.stack([l_BXE, l_BXE], 2), BatchReducer())
    assert abs(heads.item() - want) <= 1e-15


def test_weighted_mi_loss_hand_example() -> None:
    """SUT's reference weights every row by its remaining halting mass, in H(E|X) and in the
    marginal: H(E|X) = Σ w·H(p)/Σ w, p(e) = Σ w·p/Σ w."""
    rows = [((0.8, 0.2), 1.0), ((0.4, 0.6), 0.25), ((0.5, 0.5), 0.5)]
    W = sum(w for _, w in rows)
    h_cond = sum(w * _h(*p) for p, w in rows) / W
    marg = [sum(w * p[e] for p, w in rows) / W for e in (0, 1)]
    logits = _logits(*(p for p, _ in rows))
    weights = torch.tensor([w for _, w in rows], dtype=torch.float64)
    red = BatchReducer()
    got = losses.mutual_information_loss(logits, red, weights_N=weights)
    assert abs(got.item() - (h_cond - _h(*marg))) <= 1e-15
    ref = losses.mutual_information_loss(logits, red, reference_sign=True, weights_N=weights)
    assert abs(ref.item() - (h_cond + _h(*marg))) <= 1e-15
    uniform = losses.mutual_information_loss(logits, red)
    assert abs(uniform.item() - got.item()) > 1e-4


def hf_load_balancing_loss(layer_logits: list[torch.Tensor], E: int, K: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` (Mixtral, Jamba; no attention mask), written
    out: softmax and top-k over the rows of all layers concatenated, per-k token shares and mean
    probabilities over those rows, E·Σ."""
    logits = torch.cat(layer_logits, dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, K, dim=-1).indices
    share_KE = F.one_hot(chosen, E).to(probs.dtype).mean(0)
    return E * (share_KE * probs.mean(0)[None, :]).sum()


def test_pooled_switch_loss_equals_transformers_formula() -> None:
    E, K = 6, 2
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(20, E, generator=g, dtype=torch.float64) * s for s in (0.5, 1.0, 2.0)]
    pool, per_layer = losses.SwitchPool(), torch.zeros((), dtype=torch.float64)
    for lg in layers:
        r = route(lg, K)
        pool.add(r, r.counts(E))
        per_layer = per_layer + losses.switch_loss(r, r.counts(E), BatchReducer())
    want = hf_load_balancing_loss(layers, E, K)
    got = pool.loss(BatchReducer())
    assert abs(got.item() / want.item() - 1) <= 1e-12
    assert abs(per_layer.item() / got.item() - 3) < 0.5 and abs(per_layer - got) > 1e-3
