"""MoEUT: Mixture-of-Experts Universal Transformer (Csordás et al., NeurIPS 2024).

G distinct layers are applied ABAB… for R = n_layers / G repeats, so every expert bank is called
R times per forward. Each layer is SwitchHead attention (V and O projections are per-head experts)
followed by a σ-MoE feed-forward (sigmoid top-k gates, no renormalisation, ReLU experts). Layer
norms are "peri": only the inputs of maps that feed a softmax/sigmoid are normalised.
Every default follows the authors' code (RobertCsordas/moeut, `moeut/moeut.py`):
- entropy regulariser (`entropy_pooling=sequence`): per router, the selection softmax of each
  sequence is averaged over its positions and all R calls, −H is taken per sequence (and per
  head for the attention selectors) and averaged over the batch; `entropy_pooling=batch` pools
  every token of the batch into one mean instead;
- init: the FFN router's rows are unit-normalised with the matrix's std kept (every row the same
  norm); the attention selectors' rows keep each row's own std (row norms vary), as the
  reference's `renorm_rows`.

Legend: B batch, S new positions, T = B·S tokens, D model width, H heads, Dh head width,
A attention experts per head, K experts per token (or per head), E FFN experts, V vocabulary,
R repeats, G distinct layers, P past + new positions, N rows sent to a bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import losses
from models.common.attention import KVCache, apply_rope, causal_attention
from models.common.context import MoEContext
from models.common.experts import ExpertBank, LinearExperts, MLPExperts
from models.common.layers import Embedding, Linear, reset_unless_meta
from models.common.moe import moe_combine, record_routing
from models.common.router import Routing, TopKRouter, route, router_dtype, skew_bias
from models.common.rules import Rule, above, at_least, between, multiple_of, one_of, up_to
from models.spec import ModelSpec, register


@dataclass
class MoEUTConfig:
    family: str = "moeut"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4  # unrolled depth; must be divisible by group_size
    group_size: int = 2  # G distinct layers
    n_heads: int = 4
    d_head: int = 16
    num_experts: int = 8  # σ-MoE experts per layer
    top_k: int = 2
    expert_hidden: int = 32  # 128 in every published config
    att_experts: int = 4  # per head; 1 = dense V/O with a sigmoid output gate per head
    att_top_k: int = 2
    rope_fraction: float = 0.5  # RoPE on the first half of each head's channels
    rope_base: float = 10000.0
    aux_entropy: float = 0.01  # FFN router entropy regulariser
    aux_att_entropy: float = 0.001  # attention router entropy regulariser
    entropy_pooling: str = "sequence"  # sequence (reference code) | batch (one batch mean)
    expert_dropout: float = 0.0  # FFN: drop experts from top-k selection (training only)
    att_expert_dropout: float = 0.0
    dropout: float = 0.0  # on the attention output (reference placement)
    route_skew: float = 0.0
    RULES: ClassVar[tuple[Rule, ...]] = ()  # the table below


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
RULES = MoEUTConfig.RULES = (
    one_of("family", ("moeut",), "choose the family with model=<family>_<size>, not {key}"),
    at_least("vocab_size", 2, "e.g. {key}=256"),
    at_least("d_model", 1, "e.g. {key}=64"),
    at_least("n_layers", 1, "e.g. {key}=4 (the unrolled depth)"),
    at_least("group_size", 1, "e.g. {key}=2 (distinct layers)"),
    multiple_of(
        "n_layers",
        "group_size",
        "use a multiple of model.group_size={cfg.group_size}, "
        "or a model.group_size that divides {key}",
        bad=3,
    ),
    at_least("n_heads", 1, "e.g. {key}=4"),
    at_least("d_head", 1, "e.g. {key}=16"),
    at_least("num_experts", 1, "e.g. {key}=8"),
    up_to(
        "top_k",
        "num_experts",
        "pick 1 … model.num_experts={cfg.num_experts}, or raise model.num_experts",
    ),
    at_least("expert_hidden", 1, "e.g. {key}=128"),
    at_least("att_experts", 1, "e.g. {key}=4", note="1 = dense V/O, gated per head"),
    Rule(
        "att_top_k",
        lambda v, c: v >= 1 and (v <= c.att_experts or c.att_experts == 1),
        "in [1, att_experts] unless att_experts=1",
        "pick 1 … model.att_experts={cfg.att_experts}, or raise model.att_experts",
        0,
    ),
    between("rope_fraction", 0, 1, "e.g. {key}=0.5 (the share of each head's channels)"),
    above("rope_base", 0, "e.g. {key}=10000"),
    at_least("aux_entropy", 0, "e.g. {key}=0.01 (0 = off)"),
    at_least("aux_att_entropy", 0, "e.g. {key}=0.001 (0 = off)"),
    one_of("entropy_pooling", ("sequence", "batch")),
    between("expert_dropout", 0, 1, "e.g. {key}=0 (off)", hi_open=True),
    between("att_expert_dropout", 0, 1, "e.g. {key}=0 (off)", hi_open=True),
    between("dropout", 0, 1, "e.g. {key}=0 (off)", hi_open=True),
    at_least("route_skew", 0, "e.g. {key}=0 (off)", note="a Zipf exponent"),
)


def _unit_rows_keep_std_(w: Tensor) -> None:
    """Reference FFN router init: rows to unit norm, then the whole matrix back to its former
    std (every row ends with the same norm)."""
    with torch.no_grad():
        std = w.std()
        w.div_(w.norm(dim=-1, keepdim=True))
        w.mul_(std / w.std())


def _rows_keep_own_std_(w: Tensor) -> None:
    """Reference attention-selector init (`renorm_rows`): row r becomes w_r/|w_r| · std_r/s,
    std_r the row's std before and s the std of the row-normalised matrix (norms vary)."""
    with torch.no_grad():
        std_R1 = w.std(dim=-1, keepdim=True)
        w.div_(w.norm(dim=-1, keepdim=True))
        w.mul_(std_R1 / w.std())


def sigma_route(logits_XE: Tensor, k: int, dropout: float, training: bool) -> Routing:
    """Sigmoid top-k over the last dim, no renormalisation; optional expert dropout (training).

    Dropped experts are excluded from the top-k choice only; gates are the undropped sigmoids.
    """
    if not (training and dropout > 0):
        return route(logits_XE, k, "sigmoid", renormalize=False)
    scores_XE = torch.sigmoid(logits_XE)
    drop_XE = torch.rand_like(scores_XE) < dropout
    _, expert_XK = scores_XE.masked_fill(drop_XE, float("-inf")).topk(k, dim=-1)
    return Routing(expert_XK, scores_XE.gather(-1, expert_XK), logits_XE, scores_XE)


class SigmaRouter(TopKRouter):
    """TopKRouter whose init unit-normalises the rows (reference); used for its `logits`."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _unit_rows_keep_std_(self.weight)


class SigmaMoE(nn.Module):
    """σ-MoE: experts see the raw residual x, the router sees LN2(x)."""

    def __init__(self, cfg: MoEUTConfig, scale: float) -> None:
        super().__init__()
        d, E, h = cfg.d_model, cfg.num_experts, cfg.expert_hidden
        self.top_k = cfg.top_k
        self.dropout = cfg.expert_dropout
        self.router = SigmaRouter(
            d, E, cfg.top_k, "sigmoid", False, cfg.route_skew, std=scale / math.sqrt(d)
        )
        self.experts = MLPExperts(
            E,
            d,
            h,
            activation="relu",
            bias=False,
            std_in=scale / math.sqrt(d),
            std_out=scale / math.sqrt(E * h),
        )

    def forward(self, x_BSD: Tensor, xn_BSD: Tensor, ctx: MoEContext) -> tuple[Tensor, Tensor]:
        """Returns the update and the router logits [T, E] (for the layer's entropy loss)."""
        B, S, D = x_BSD.shape
        logits_TE = self.router.logits(xn_BSD.reshape(B * S, D))
        routing = sigma_route(logits_TE, self.top_k, self.dropout, self.training)
        y_TD = moe_combine(self.experts, x_BSD.reshape(B * S, D), routing)
        record_routing(ctx, self.experts, routing, {}, batch=B)
        return y_TD.view(B, S, D), logits_TE


class SwitchHead(nn.Module):
    """SwitchHead attention: dense Q/K, per-head V and O experts chosen by sigmoid selectors.

    Q and K are each scaled by Dh^-1/4 and the attention scale is 1 (reference). With A = 1 the
    V/O maps are dense and each head's output is scaled by a sigmoid gate instead.
    """

    def __init__(self, cfg: MoEUTConfig, scale: float) -> None:
        super().__init__()
        d, H, dh, A = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_experts
        self.n_heads, self.d_head, self.n_exp, self.top_k = H, dh, A, cfg.att_top_k
        if A > 1 and not 1 <= cfg.att_top_k <= A:
            raise ValueError(f"att_top_k={cfg.att_top_k} must be in [1, att_experts={A}]")
        self.dropout = cfg.att_expert_dropout
        self.rot_dim = int(dh * cfg.rope_fraction) // 2 * 2
        self.rope_base = cfg.rope_base
        std_in, std_o = scale / math.sqrt(d), scale / math.sqrt(H * dh)
        self.q = Linear(d, H * dh, bias=False, std=std_in)
        self.k = Linear(d, H * dh, bias=False, std=std_in)
        self.v: nn.Module
        self.o: nn.Module
        if A > 1:
            self.v = LinearExperts(H * A, d, dh, std=std_in)
            self.o = LinearExperts(H * A, dh, d, std=std_o)
            self.sel_v = nn.Parameter(torch.empty(H * A, d))
        else:
            self.v = Linear(d, H * dh, bias=False, std=std_in)
            self.o = Linear(H * dh, d, bias=False, std=std_o)
        self.sel_o = nn.Parameter(torch.empty(H * A, d))
        self.route_skew = cfg.route_skew
        self.register_buffer("skew_A", torch.empty(A, dtype=torch.float64), persistent=False)
        self.std_in = std_in
        reset_unless_meta(self)

    def reset_parameters(self) -> None:
        """The selectors (this module's own parameters) and the skew bias; Q/K/V/O init
        themselves ([Note: init protocol] in models/common/layers.py)."""
        with torch.no_grad():
            for name in ("sel_v", "sel_o"):
                if hasattr(self, name):
                    getattr(self, name).normal_(0.0, self.std_in)
                    _rows_keep_own_std_(getattr(self, name))
            self.skew_A.copy_(skew_bias(self.n_exp, self.route_skew))

    def _route(self, xn_TD: Tensor, sel: Tensor) -> Routing:
        """Per-head sigmoid top-k: routing tensors are [T, H, A] / [T, H, K]."""
        dt = router_dtype(xn_TD)
        logits_THA = F.linear(xn_TD.to(dt), sel.to(dt)).view(-1, self.n_heads, self.n_exp)
        logits_THA = logits_THA + self.skew_A.to(dt)
        return sigma_route(logits_THA, self.top_k, self.dropout, self.training)

    def _ids(self, rt: Routing) -> Tensor:
        """Global expert ids h·A + e [T, H, K] (head h owns bank experts h·A .. h·A + A − 1)."""
        offset_H1 = torch.arange(self.n_heads, device=rt.expert_TK.device)[:, None] * self.n_exp
        return rt.expert_TK + offset_H1

    def _bank_ids(self, rt: Routing, bank: ExpertBank, ctx: MoEContext, batch: int) -> Tensor:
        """Global expert ids [T, H, K]; records the bank's load."""
        ids_THK = self._ids(rt)
        T = ids_THK.shape[0]
        flat = Routing(
            ids_THK.reshape(T, -1),
            rt.gate_TK.reshape(T, -1),
            rt.logits_TE.reshape(T, -1),
            rt.scores_TE.reshape(T, -1),
        )
        record_routing(ctx, bank, flat, {}, batch=batch)
        return ids_THK

    def _values(self, x_TD: Tensor, rt: Routing, ctx: MoEContext, batch: int) -> Tensor:
        """v_h = Σ_k g_hk · x·W_v[h, e_hk]  → [T, H, Dh]."""
        T, (H, K) = x_TD.shape[0], rt.expert_TK.shape[1:]
        ids_THK = self._bank_ids(rt, self.v, ctx, batch)
        y_Nd = self.v(x_TD.repeat_interleave(H * K, dim=0), ids_THK.reshape(-1))
        gate_THK1 = rt.gate_TK.to(y_Nd.dtype).unsqueeze(-1)
        return (y_Nd.view(T, H, K, -1) * gate_THK1).sum(2)

    def _outputs(self, att_THd: Tensor, rt: Routing, ctx: MoEContext, batch: int) -> Tensor:
        """y = Σ_h Σ_k g_hk · att_h·W_o[h, e_hk]  → [T, D]."""
        T, (H, K) = att_THd.shape[0], rt.expert_TK.shape[1:]
        ids_THK = self._bank_ids(rt, self.o, ctx, batch)
        rows_Nd = att_THd.unsqueeze(2).expand(T, H, K, self.d_head).reshape(T * H * K, -1)
        y_ND = self.o(rows_Nd, ids_THK.reshape(-1))
        gate_TN1 = rt.gate_TK.to(y_ND.dtype).reshape(T, H * K, 1)  # N = H·K slots per token
        return (y_ND.view(T, H * K, -1) * gate_TN1).sum(1)

    def forward(
        self, x_BSD: Tensor, xn_BSD: Tensor, ctx: MoEContext, cache: KVCache | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Q, K and the selectors see LN1(x); V sees the raw x. Returns (update, router logits)."""
        B, S, D = x_BSD.shape
        H, dh, T = self.n_heads, self.d_head, B * S
        past = cache.length if cache is not None else 0
        qk_scale = dh**-0.25
        q_BHSd = (self.q(xn_BSD) * qk_scale).view(B, S, H, dh).transpose(1, 2)
        k_BHPd = (self.k(xn_BSD) * qk_scale).view(B, S, H, dh).transpose(1, 2)
        if self.rot_dim:
            pos_S = torch.arange(past, past + S, device=x_BSD.device)
            q_BHSd = apply_rope(q_BHSd, pos_S, self.rot_dim, self.rope_base)
            k_BHPd = apply_rope(k_BHPd, pos_S, self.rot_dim, self.rope_base)
        xn_TD = xn_BSD.reshape(T, D)
        logits: dict[str, Tensor] = {}
        if self.n_exp > 1:
            v_rt, o_rt = self._route(xn_TD, self.sel_v), self._route(xn_TD, self.sel_o)
            logits = {"att_v": v_rt.logits_TE, "att_o": o_rt.logits_TE}
            # W_o's experts are chosen now: the runtime may start their exchange behind V and
            # attention (same ids as `_outputs` computes)
            self.o.announce(self._ids(o_rt).reshape(-1))
            v_THd = self._values(x_BSD.reshape(T, D), v_rt, ctx, B)
        else:
            v_THd = self.v(x_BSD).view(T, H, dh)
        v_BHPd = v_THd.view(B, S, H, dh).transpose(1, 2)
        if cache is not None:
            k_BHPd, v_BHPd = cache.extend(k_BHPd, v_BHPd)
        att_BHSd = causal_attention(q_BHSd, k_BHPd, v_BHPd, scale=1.0)
        att_THd = att_BHSd.transpose(1, 2).reshape(T, H, dh)
        if self.n_exp > 1:
            y_TD = self._outputs(att_THd, o_rt, ctx, B)
        else:
            dt = router_dtype(xn_TD)
            gate_TH = torch.sigmoid(F.linear(xn_TD.to(dt), self.sel_o.to(dt))).to(att_THd.dtype)
            y_TD = self.o((att_THd * gate_TH.unsqueeze(-1)).reshape(T, H * dh))
        return y_TD.view(B, S, D), logits


class MoEUTLayer(nn.Module):
    def __init__(self, cfg: MoEUTConfig, scale: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attention = SwitchHead(cfg, scale)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = SigmaMoE(cfg, scale)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x_BSD: Tensor, ctx: MoEContext, cache: KVCache | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        att_BSD, logits = self.attention(x_BSD, self.ln1(x_BSD), ctx, cache)
        x_BSD = x_BSD + self.drop(att_BSD)
        upd_BSD, logits["ffn"] = self.ffn(x_BSD, self.ln2(x_BSD), ctx)
        return x_BSD + upd_BSD, logits


class MoEUT(nn.Module):
    def __init__(self, cfg: MoEUTConfig) -> None:
        super().__init__()
        if cfg.n_layers % cfg.group_size:
            raise ValueError(
                f"n_layers={cfg.n_layers} is not divisible by group_size={cfg.group_size}"
            )
        if cfg.entropy_pooling not in ("sequence", "batch"):
            raise ValueError(f"entropy_pooling={cfg.entropy_pooling!r}: use sequence | batch")
        self.cfg = cfg
        self.n_repeats = cfg.n_layers // cfg.group_size
        scale = math.sqrt(2.0 / cfg.n_layers)  # from the unrolled depth
        # Kaiming-normal, fan-in, linear gain (reference): std 1/√D
        self.embedding = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.d_model**-0.5)
        self.layers = nn.ModuleList(MoEUTLayer(cfg, scale) for _ in range(cfg.group_size))
        self.out_norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)  # untied, with bias, torch's init

    def new_cache(self) -> list[KVCache]:
        """One KV cache per unrolled layer (R·G of them)."""
        return [KVCache() for _ in range(self.cfg.n_layers)]

    def forward(
        self, tokens_BS: Tensor, ctx: MoEContext | None = None, cache: list[KVCache] | None = None
    ) -> Tensor:
        ctx = ctx if ctx is not None else MoEContext()
        x_BSD = self.embedding(tokens_BS)
        # per distinct layer: router name -> logits of each of its R calls
        calls: list[dict[str, list[Tensor]]] = [{} for _ in self.layers]
        for r in range(self.n_repeats):
            for g, layer in enumerate(self.layers):
                i = r * len(self.layers) + g
                x_BSD, logits = layer(x_BSD, ctx, cache[i] if cache else None)
                for name, l in logits.items():
                    calls[g].setdefault(name, []).append(l)
        self._entropy_losses(calls, ctx, batch=tokens_BS.shape[0])
        return self.lm_head(self.out_norm(x_BSD))

    def _entropy_losses(
        self, calls: list[dict[str, list[Tensor]]], ctx: MoEContext, batch: int
    ) -> None:
        """One entropy regulariser per router over the logits of all its R calls.

        Logits are [T, E] (FFN) or [T, H, A] (attention selectors, −H per head, averaged).
        """
        cfg = self.cfg
        coef = {"ffn": cfg.aux_entropy, "att_v": cfg.aux_att_entropy, "att_o": cfg.aux_att_entropy}
        for per_layer in calls:
            for name, ls in per_layer.items():
                if not coef[name]:
                    continue
                if cfg.entropy_pooling == "sequence":  # [B, R·S, ...]: each sequence's rows
                    l_BX = torch.cat([l.view(batch, -1, *l.shape[1:]) for l in ls], dim=1)
                    reg = losses.sequence_entropy_regularizer(l_BX, ctx.reducer)
                else:
                    reg = losses.entropy_regularizer(torch.cat(ls, dim=0), ctx.reducer).mean()
                ctx.add_aux("entropy" if name == "ffn" else "att_entropy", coef[name] * reg)


def _published(
    d: int,
    n_layers: int,
    heads: int,
    d_head: int,
    experts: int,
    k: int,
    att_experts: int,
    group: int,
) -> MoEUTConfig:
    return MoEUTConfig(
        vocab_size=8000,
        d_model=d,
        n_layers=n_layers,
        group_size=group,
        n_heads=heads,
        d_head=d_head,
        num_experts=experts,
        top_k=k,
        expert_hidden=128,
        att_experts=att_experts,
    )


SPEC = register(
    ModelSpec(
        name="moeut",
        config_cls=MoEUTConfig,
        builder=MoEUT,
        presets={
            "tiny": MoEUTConfig(),
            # (d, layers, heads, d_head, FFN experts, k, attention experts, G); vocab 8000
            "44m": _published(412, 16, 4, 82, 155, 12, 8, 2),
            "126m": _published(768, 18, 4, 96, 254, 12, 10, 2),
            "244m": _published(1024, 18, 4, 128, 387, 16, 10, 2),
            "318m": _published(1024, 24, 4, 128, 338, 16, 10, 3),
            "727m": _published(1024, 36, 5, 128, 467, 20, 13, 4),
            "1b": _published(1536, 36, 6, 128, 565, 24, 12, 4),
        },
    )
)
