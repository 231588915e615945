"""Routers and auxiliary losses in one process (world-size invariance: tests/dist)."""

from __future__ import annotations

import math

import torch

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
