"""Top-k routers. Router math runs in fp32 (fp64 when the model is fp64).

Legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common.layers import reset_unless_meta


@dataclass
class Routing:
    expert_TK: Tensor  # int64 expert ids, best first
    gate_TK: Tensor  # weights of the chosen experts (router compute dtype)
    logits_TE: Tensor  # pre-activation logits, skew bias included
    scores_TE: Tensor  # softmax or sigmoid of the logits

    def counts(self, num_experts: int) -> Tensor:
        """Local tokens per expert [E] (int64)."""
        return torch.bincount(self.expert_TK.flatten(), minlength=num_experts)


def router_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def skew_bias(num_experts: int, route_skew: float) -> Tensor:
    """Fixed Zipf bias: expert e gets −s·ln(e+1), so at uniform logits p_e ∝ (e+1)^−s."""
    return -route_skew * torch.log1p(torch.arange(num_experts, dtype=torch.float64))


class Router(nn.Module):
    """Base class of every router module in the zoo: `logits(x_TD) -> [T, E]` pre-activation
    scores in fp32 (fp64 for fp64 models), skew bias included. The runtime finds routers with
    `isinstance(module, Router)` (to time them, for instance), never by class name. A family's
    router subclasses it and sets `num_experts`."""

    num_experts: int

    def logits(self, x_TD: Tensor) -> Tensor:
        raise NotImplementedError


class TopKRouter(Router):
    """Linear scores → softmax or sigmoid → top-k, optionally renormalised gates.

    `route_skew` (Zipf exponent, 0 = off) adds a fixed bias to the logits to force skewed
    routing for benchmarks and tests (`model.route_skew`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        score: Literal["softmax", "sigmoid"] = "softmax",
        renormalize: bool = False,
        route_skew: float = 0.0,
        std: float | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.renormalize = renormalize
        self.route_skew = route_skew
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.std = std if std is not None else 1.0 / math.sqrt(d_model)
        skew_E = torch.empty(num_experts, dtype=torch.float64)
        self.register_buffer("skew_E", skew_E, persistent=False)
        reset_unless_meta(self)

    def reset_parameters(self) -> None:
        """weight ~ N(0, std²); the (non-persistent) skew bias recomputed from the config."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.std)
            self.skew_E.copy_(skew_bias(self.num_experts, self.route_skew))

    def logits(self, x_TD: Tensor) -> Tensor:
        dt = router_dtype(x_TD)
        return F.linear(x_TD.to(dt), self.weight.to(dt)) + self.skew_E.to(dt)

    def forward(self, x_TD: Tensor) -> Routing:
        return route(self.logits(x_TD), self.top_k, self.score, self.renormalize)


def route(
    logits_TE: Tensor, top_k: int, score: str = "softmax", renormalize: bool = False
) -> Routing:
    """Top-k selection from logits; shared by every router in the zoo."""
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    elif score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        raise ValueError(f"unknown router score {score!r} (softmax | sigmoid)")
    gate_TK, expert_TK = torch.topk(scores_TE, top_k, dim=-1)
    if renormalize:
        gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
    return Routing(expert_TK, gate_TK, logits_TE, scores_TE)
