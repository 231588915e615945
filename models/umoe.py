"""UMoE (Yang et al., NeurIPS 2025): attention and FFN experts unified in one shared bank.

Attention is rewritten as "pre-mix then FFN": each token picks k_att experts; expert e's
query q_{t,e} = RMSNorm_r(xn_t·A_e)·B_e + xn_t·W_qres attends over one shared key with the
normalised inputs themselves as values, z_{t,e} = Σ_{s≤t} softmax(q_{t,e}·k_s/√dqk)·xn_s, and
FFN_e(z_{t,e}) runs in the layer's expert bank. The FFN sub-layer routes xn2 = RMSNorm(x) into
the *same* bank with its own router, so the bank is called twice per layer per forward. Each
sub-layer also has one always-on shared expert (the attention one with its own query). Softmax
routers, top-k without renormalisation, DeepSeek sequence-level balance loss.

Defaults follow the authors' code (ysngki/UMoE, `PreMixMoEAttention.premix`, config
small-vanilla-UMoE-1024): RoPE on the whole query/key, scale dqk^-1/2, separate FFN router and
shared expert, and a learned RMSNorm on the rank-r query factor (one weight vector of width r
shared by the experts, the code's `q_a_layernorm`; `q_norm=true`; `q_norm=false` omits it, as
the paper's formula does).

Legend: B batch, S new positions, P past + new positions, T = B·S tokens, D model width,
E experts, K experts per token (k_att or k_ffn), N = T·K bank rows, R query rank, Q query/key
width (dqk), H query heads = 1 shared + k_att routed, F expert hidden width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common.attention import KVCache, apply_rope, causal_attention
from models.common.context import MoEContext
from models.common.experts import ExpertBank, MLPExperts
from models.common.layers import Embedding, Linear, reset_unless_meta
from models.common.moe import moe_combine, record_routing
from models.common.router import TopKRouter
from models.common.rules import Rule, above, at_least, one_of, up_to
from models.spec import ModelSpec, register


@dataclass
class UMoEConfig:
    family: str = "umoe"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    num_experts: int = 8
    expert_hidden: int = 32
    shared_hidden: int = 0  # 0 → expert_hidden (one shared expert per sub-layer)
    top_k_att: int = 2
    top_k_ffn: int = 4
    q_rank: int = 4
    d_qk: int = 16
    q_norm: bool = True  # RMSNorm on the rank-r query factor (reference code)
    rope_base: float = 10000.0
    aux_seq_balance: float = 0.001
    route_skew: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    RULES: ClassVar[tuple[Rule, ...]] = ()  # the table below


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
RULES = UMoEConfig.RULES = (
    one_of("family", ("umoe",), "choose the family with model=<family>_<size>, not {key}"),
    at_least("vocab_size", 2, "e.g. {key}=256"),
    at_least("d_model", 1, "e.g. {key}=64"),
    at_least("n_layers", 1, "e.g. {key}=2"),
    at_least("num_experts", 1, "e.g. {key}=8"),
    at_least("expert_hidden", 1, "e.g. {key}=32"),
    at_least("shared_hidden", 0, "e.g. {key}=0", note="0 = expert_hidden"),
    up_to(
        "top_k_att",
        "num_experts",
        "pick 1 … model.num_experts={cfg.num_experts}, or raise model.num_experts",
    ),
    up_to(
        "top_k_ffn",
        "num_experts",
        "pick 1 … model.num_experts={cfg.num_experts}, or raise model.num_experts",
    ),
    at_least("q_rank", 1, "e.g. {key}=4"),
    Rule(
        "d_qk",
        lambda v, _: v >= 2 and v % 2 == 0,
        "an even integer ≥ 2",
        "e.g. {key}=16 (RoPE rotates channel pairs)",
        15,
    ),
    above("rope_base", 0, "e.g. {key}=10000"),
    at_least("aux_seq_balance", 0, "e.g. {key}=0.001 (0 = off)"),
    at_least("route_skew", 0, "e.g. {key}=0 (off)", note="a Zipf exponent"),
    above("norm_eps", 0, "e.g. {key}=1e-6"),
    above("init_std", 0, "e.g. {key}=0.02"),
)


class SharedExpert(nn.Module):
    """The always-on expert of a sub-layer: W_down·SiLU(W_up·z), dense (not in the bank)."""

    def __init__(self, d: int, hidden: int, std: float) -> None:
        super().__init__()
        self.up = Linear(d, hidden, bias=False, std=std)
        self.down = Linear(hidden, d, bias=False, std=std)

    def forward(self, z: Tensor) -> Tensor:
        return self.down(F.silu(self.up(z)))


def _router(cfg: UMoEConfig, top_k: int) -> TopKRouter:
    # The reference's MoEGate keeps nn.Linear's kaiming-uniform init: std 1/√(3·D).
    std = 1.0 / math.sqrt(3 * cfg.d_model)
    return TopKRouter(cfg.d_model, cfg.num_experts, top_k, "softmax", False, cfg.route_skew, std)


class PremixAttention(nn.Module):
    """Attention sub-layer: routed low-rank queries, one shared key, values = xn, experts after."""

    def __init__(self, cfg: UMoEConfig) -> None:
        super().__init__()
        d, E, R, Q, std = cfg.d_model, cfg.num_experts, cfg.q_rank, cfg.d_qk, cfg.init_std
        if Q % 2:
            raise ValueError(f"d_qk={Q} must be even (RoPE rotates channel pairs)")
        self.d_qk, self.rope_base = Q, cfg.rope_base
        self.router = _router(cfg, cfg.top_k_att)
        # Per-expert low-rank query factors: ordinary dense parameters, used outside the bank.
        self.q_a = nn.Parameter(torch.empty(E, d, R))
        self.q_b = nn.Parameter(torch.empty(E, R, Q))
        self.q_norm = nn.RMSNorm(R, eps=cfg.norm_eps) if cfg.q_norm else None
        self.q_res = Linear(d, Q, bias=False, std=std)
        self.q_shared = Linear(d, Q, bias=False, std=std)  # the shared expert's own query
        self.k = Linear(d, Q, bias=False, std=std)
        self.shared = SharedExpert(d, cfg.shared_hidden or cfg.expert_hidden, std)
        self.aux = {"seq_balance": cfg.aux_seq_balance} if cfg.aux_seq_balance else {}
        self.std = std
        reset_unless_meta(self)

    def reset_parameters(self) -> None:
        """This module's own parameters: the low-rank query factors ~ N(0, std²)."""
        with torch.no_grad():
            self.q_a.normal_(0.0, self.std)
            self.q_b.normal_(0.0, self.std)

    def routed_queries(self, xn_TD: Tensor, expert_TK: Tensor) -> Tensor:
        """q_{t,e} = RMSNorm_r(xn_t·A_e)·B_e + xn_t·W_qres for the K chosen experts of each
        token [T, K, Q] (no norm with `q_norm=false`)."""
        R = self.q_a.shape[2]
        # xn·A for every expert is cheap (R is small) and avoids gathering [T, K, D, R].
        u_TER = torch.einsum("td,edr->ter", xn_TD, self.q_a)
        u_TKR = u_TER.gather(1, expert_TK.unsqueeze(-1).expand(-1, -1, R))
        if self.q_norm is not None:
            u_TKR = self.q_norm(u_TKR)
        q_TKQ = torch.einsum("tkr,tkrq->tkq", u_TKR, self.q_b[expert_TK])
        return q_TKQ + self.q_res(xn_TD).unsqueeze(1)

    def forward(
        self, xn_BSD: Tensor, bank: ExpertBank, ctx: MoEContext, cache: KVCache | None
    ) -> Tensor:
        B, S, D = xn_BSD.shape
        T = B * S
        xn_TD = xn_BSD.reshape(T, D)
        routing = self.router(xn_TD)
        K = routing.expert_TK.shape[1]
        q_TKQ = self.routed_queries(xn_TD, routing.expert_TK)
        q_THQ = torch.cat([self.q_shared(xn_TD).unsqueeze(1), q_TKQ], dim=1)
        q_BHSQ = q_THQ.view(B, S, K + 1, -1).transpose(1, 2)
        k_B1SQ = self.k(xn_BSD).unsqueeze(1)
        past = cache.length if cache is not None else 0
        pos_S = torch.arange(past, past + S, device=xn_BSD.device)
        q_BHSQ = apply_rope(q_BHSQ, pos_S, self.d_qk, self.rope_base)
        k_B1SQ = apply_rope(k_B1SQ, pos_S, self.d_qk, self.rope_base)
        v_B1SD = xn_BSD.unsqueeze(1)  # values are the normalised inputs (no V projection)
        if cache is not None:
            k_B1SQ, v_B1SD = cache.extend(k_B1SQ, v_B1SD)
        z_BHSD = causal_attention(q_BHSQ, k_B1SQ, v_B1SD, scale=self.d_qk**-0.5)
        y_BSD = self.shared(z_BHSD[:, 0])
        # Rows (token, k) in routing order: the bank sees T·K pre-mixed vectors with expert ids.
        z_ND = z_BHSD[:, 1:].permute(0, 2, 1, 3).reshape(T * K, D)
        y_ND = bank(z_ND, routing.expert_TK.reshape(-1))
        gate_TK1 = routing.gate_TK.to(y_ND.dtype).unsqueeze(-1)
        y_TD = (y_ND.view(T, K, D) * gate_TK1).sum(1)
        record_routing(ctx, bank, routing, self.aux, batch=B)
        return y_BSD + y_TD.view(B, S, D)


class RoutedFeedForward(nn.Module):
    """FFN sub-layer: its own router into the layer's shared bank, plus its own shared expert."""

    def __init__(self, cfg: UMoEConfig) -> None:
        super().__init__()
        self.router = _router(cfg, cfg.top_k_ffn)
        hidden = cfg.shared_hidden or cfg.expert_hidden
        self.shared = SharedExpert(cfg.d_model, hidden, cfg.init_std)
        self.aux = {"seq_balance": cfg.aux_seq_balance} if cfg.aux_seq_balance else {}

    def forward(self, xn_BSD: Tensor, bank: ExpertBank, ctx: MoEContext) -> Tensor:
        B, S, D = xn_BSD.shape
        xn_TD = xn_BSD.reshape(B * S, D)
        routing = self.router(xn_TD)
        y_TD = moe_combine(bank, xn_TD, routing)
        record_routing(ctx, bank, routing, self.aux, batch=B)
        return self.shared(xn_BSD) + y_TD.view(B, S, D)


class UMoELayer(nn.Module):
    """Pre-RMSNorm block; the bank is owned here once and handed to both sub-layers."""

    def __init__(self, cfg: UMoEConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.experts = MLPExperts(
            cfg.num_experts,
            d,
            cfg.expert_hidden,
            activation="silu",
            bias=False,
            std_in=cfg.init_std,
            std_out=cfg.init_std,
        )
        self.norm_att = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.att = PremixAttention(cfg)
        self.norm_ffn = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.ffn = RoutedFeedForward(cfg)

    def forward(self, x_BSD: Tensor, ctx: MoEContext, cache: KVCache | None = None) -> Tensor:
        x_BSD = x_BSD + self.att(self.norm_att(x_BSD), self.experts, ctx, cache)
        return x_BSD + self.ffn(self.norm_ffn(x_BSD), self.experts, ctx)


class UMoE(nn.Module):
    def __init__(self, cfg: UMoEConfig) -> None:
        super().__init__()
        for name in ("top_k_att", "top_k_ffn"):
            k = getattr(cfg, name)
            if not 1 <= k <= cfg.num_experts:
                raise ValueError(f"{name}={k} must be in [1, num_experts={cfg.num_experts}]")
        self.cfg = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std)
        self.layers = nn.ModuleList(UMoELayer(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # Untied, as the reference (tie_word_embeddings false).
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False, std=cfg.init_std)

    def new_cache(self) -> list[KVCache]:
        """Per layer: RoPE'd keys [B,1,P,Q] and the normalised inputs (the values) [B,1,P,D]."""
        return [KVCache() for _ in self.layers]

    def forward(
        self, tokens_BS: Tensor, ctx: MoEContext | None = None, cache: list[KVCache] | None = None
    ) -> Tensor:
        ctx = ctx if ctx is not None else MoEContext()
        x_BSD = self.tok_emb(tokens_BS)
        for i, layer in enumerate(self.layers):
            x_BSD = layer(x_BSD, ctx, cache[i] if cache else None)
        return self.lm_head(self.norm_f(x_BSD))


SPEC = register(
    ModelSpec(
        name="umoe",
        config_cls=UMoEConfig,
        builder=UMoE,
        presets={
            "tiny": UMoEConfig(),
            # ysngki/UMoE small-vanilla-UMoE-1024 (vocab 32000, d_qk = 128 nope + 64 rope)
            "small": UMoEConfig(
                vocab_size=32000,
                d_model=768,
                n_layers=12,
                num_experts=128,
                expert_hidden=192,
                top_k_att=3,
                top_k_ffn=15,
                q_rank=16,
                d_qk=192,
            ),
        },
    )
)
