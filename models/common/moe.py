"""Token-choice MoE feed-forward on the expert bank.

Legend: B batch, S sequence, T = B·S tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import Tensor, nn

from models.common import losses
from models.common.context import MoEContext
from models.common.experts import ExpertBank
from models.common.router import Routing, TopKRouter

AUX_POOLING = ("per_layer", "pooled")


class MoEFeedForward(nn.Module):
    """Route, run each (token, expert) pair through the bank, gate and sum the K outputs.

    `aux` maps a loss name to its coefficient: `switch` (load balancing), `z` (router z-loss),
    `seq_balance` (DeepSeek sequence-level). Zero coefficients are skipped. `aux_pooling`:
    "per_layer" adds one Switch loss per call (GShard, Megatron, DeepSpeed: ≈ n_layers·K at
    uniform routing); "pooled" pools every call's counts and scores into one loss
    (transformers' `load_balancing_loss_func`: ≈ K), finished by `MoEContext.finish`.
    """

    def __init__(
        self,
        router: TopKRouter,
        experts: ExpertBank,
        aux: dict[str, float] | None = None,
        aux_pooling: str = "per_layer",
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.aux = {k: v for k, v in (aux or {}).items() if v}
        unknown = set(self.aux) - set(_AUX)
        if unknown:
            raise ValueError(f"unknown aux losses {sorted(unknown)}; known: {sorted(_AUX)}")
        if aux_pooling not in AUX_POOLING:
            raise ValueError(f"aux_pooling={aux_pooling!r}: use one of {AUX_POOLING}")
        self.aux_pooling = aux_pooling

    def forward(
        self, x_BSD: Tensor, ctx: MoEContext, router_in_BSD: Tensor | None = None
    ) -> Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        r_in = x_TD if router_in_BSD is None else router_in_BSD.reshape(B * S, -1)
        routing = self.router(r_in)
        y_TD = moe_combine(self.experts, x_TD, routing)
        counts_E = losses.global_counts(routing, routing.scores_TE.shape[1], ctx.reducer)
        aux = self.aux
        if self.aux_pooling == "pooled" and "switch" in aux:
            pool = ctx.pool("switch", aux["switch"], losses.SwitchPool)
            cast(losses.SwitchPool, pool).add(routing, counts_E)
            aux = {k: v for k, v in aux.items() if k != "switch"}
        record_routing(ctx, self.experts, routing, aux, batch=B, counts_E=counts_E)
        return y_TD.view(B, S, -1)


def moe_combine(experts: ExpertBank, x_TD: Tensor, routing: Routing) -> Tensor:
    """Σ_k gate_k · expert_k(x): repeat each token K times, one bank call, weighted sum."""
    T, K = routing.expert_TK.shape
    y_NO = experts(x_TD.repeat_interleave(K, dim=0), routing.expert_TK.reshape(-1))
    gate_TK1 = routing.gate_TK.to(y_NO.dtype).unsqueeze(-1)
    return (y_NO.view(T, K, experts.out_features) * gate_TK1).sum(1)


def record_routing(
    ctx: MoEContext,
    bank: ExpertBank,
    routing: Routing,
    aux: dict[str, float],
    batch: int,
    counts_E: Tensor | None = None,
) -> None:
    """Global load of this call into the context, plus the weighted auxiliary losses."""
    if counts_E is None:
        counts_E = losses.global_counts(routing, routing.scores_TE.shape[1], ctx.reducer)
    ctx.add_load(bank.bank_name, counts_E)
    for name, coef in aux.items():
        ctx.add_aux(name, coef * _AUX[name](routing, counts_E, ctx, batch))


_AUX: dict[str, Callable[[Routing, Tensor, MoEContext, int], Tensor]] = {
    "switch": lambda r, c, ctx, b: losses.switch_loss(r, c, ctx.reducer),
    "z": lambda r, c, ctx, b: losses.z_loss(r, ctx.reducer),
    "seq_balance": lambda r, c, ctx, b: losses.sequence_balance_loss(r, b, ctx.reducer),
}
