"""Jamba (AI21, 2024): interleaved attention / Mamba layers, every other FFN a top-2 MoE.

Layer i mixes tokens with GQA attention (no positional encoding) if i % attn_period ==
attn_offset, else with a Mamba mixer (models/common/mamba.py); its FFN is an MoE if
i % expert_period == expert_offset, else a dense SwiGLU MLP. Pre-RMSNorm residual blocks, final
RMSNorm, untied LM head. MoE: softmax over all experts, top-2, no renormalisation, SwiGLU experts,
Switch aux loss (transformers' Jamba / AI21's Jamba-v0.1 config). Every default follows
transformers' `JambaForCausalLM` (matched in float64 to 2e-14), including its aux loss: one
Switch loss over the router logits of all MoE layers pooled (`load_balancing_loss_func`,
`aux_pooling=pooled`); `aux_pooling=per_layer` sums one loss per MoE layer instead.

Legend: B batch, S sequence, D model width, V vocabulary, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from models.common.attention import CausalSelfAttention, KVCache
from models.common.context import MoEContext
from models.common.experts import ExpertBank, MLPExperts
from models.common.layers import Embedding, Linear
from models.common.mamba import MambaCache, MambaMixer
from models.common.moe import AUX_POOLING, MoEFeedForward
from models.common.router import TopKRouter
from models.common.rules import Rule, above, at_least, multiple_of, one_of, up_to
from models.spec import ModelSpec, register


@dataclass
class JambaConfig:
    family: str = "jamba"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 128  # dense MLP and expert hidden width
    attn_period: int = 4
    attn_offset: int = 1
    expert_period: int = 2
    expert_offset: int = 1
    num_experts: int = 8
    top_k: int = 2
    d_state: int = 8
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 → ceil(d_model / 16)
    scan: str = "chunked"  # chunked | sequential (same function; chunked is faster on CPU)
    scan_chunk: int = 16
    aux_switch: float = 0.001
    aux_pooling: str = "pooled"  # pooled (transformers) | per_layer (GShard)
    aux_z: float = 0.0
    route_skew: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    RULES: ClassVar[tuple[Rule, ...]] = ()  # the table below


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
RULES = JambaConfig.RULES = (
    one_of("family", ("jamba",), "choose the family with model=<family>_<size>, not {key}"),
    at_least("vocab_size", 2, "e.g. {key}=256"),
    at_least("d_model", 1, "e.g. {key}=64"),
    at_least("n_layers", 1, "e.g. {key}=4"),
    at_least("n_heads", 1, "e.g. {key}=4"),
    multiple_of(
        "d_model",
        "n_heads",
        "use a multiple of model.n_heads={cfg.n_heads}, or a model.n_heads that divides {key}",
        bad=63,
    ),
    at_least("n_kv_heads", 1, "e.g. {key}=2"),
    multiple_of(
        "n_heads",
        "n_kv_heads",
        "use a multiple of model.n_kv_heads={cfg.n_kv_heads}, "
        "or a model.n_kv_heads that divides {key}",
        bad=1,
    ),
    at_least("d_ff", 1, "e.g. {key}=128"),
    at_least("attn_period", 1, "e.g. {key}=4"),
    up_to(
        "attn_offset",
        "attn_period",
        "pick 0 … model.attn_period-1 (model.attn_period={cfg.attn_period})",
        lo=0,
        below=True,
    ),
    at_least("expert_period", 1, "e.g. {key}=2"),
    up_to(
        "expert_offset",
        "expert_period",
        "pick 0 … model.expert_period-1 (model.expert_period={cfg.expert_period})",
        lo=0,
        below=True,
    ),
    at_least("num_experts", 1, "e.g. {key}=8"),
    up_to(
        "top_k",
        "num_experts",
        "pick 1 … model.num_experts={cfg.num_experts}, or raise model.num_experts",
    ),
    at_least("d_state", 1, "e.g. {key}=8"),
    at_least("d_conv", 1, "e.g. {key}=4"),
    at_least("expand", 1, "e.g. {key}=2"),
    at_least("dt_rank", 0, "e.g. {key}=0", note="0 = ceil(d_model / 16)"),
    one_of("scan", ("chunked", "sequential")),
    at_least("scan_chunk", 1, "e.g. {key}=16"),
    at_least("aux_switch", 0, "e.g. {key}=0.001 (0 = off)"),
    one_of("aux_pooling", AUX_POOLING, "e.g. {key}=pooled"),
    at_least("aux_z", 0, "e.g. {key}=0 (off)"),
    at_least("route_skew", 0, "e.g. {key}=0 (off)", note="a Zipf exponent"),
    above("norm_eps", 0, "e.g. {key}=1e-6"),
    above("init_std", 0, "e.g. {key}=0.02"),
)


def is_attention_layer(cfg: JambaConfig, i: int) -> bool:
    return i % cfg.attn_period == cfg.attn_offset


def is_moe_layer(cfg: JambaConfig, i: int) -> bool:
    return i % cfg.expert_period == cfg.expert_offset


class SwiGLU(nn.Module):
    """Dense FFN of the non-MoE layers: down(SiLU(gate(x)) ⊙ up(x))."""

    def __init__(self, d: int, hidden: int, std: float, out_std: float) -> None:
        super().__init__()
        self.gate = Linear(d, hidden, bias=False, std=std)
        self.up = Linear(d, hidden, bias=False, std=std)
        self.down = Linear(hidden, d, bias=False, std=out_std)

    def forward(self, x_BSD: Tensor, ctx: MoEContext) -> Tensor:
        return self.down(F.silu(self.gate(x_BSD)) * self.up(x_BSD))


class JambaLayer(nn.Module):
    def __init__(self, cfg: JambaConfig, i: int) -> None:
        super().__init__()
        d, std = cfg.d_model, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.norm_mix = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.is_attention = is_attention_layer(cfg, i)
        self.mixer: nn.Module
        if self.is_attention:
            self.mixer = CausalSelfAttention(
                d,
                cfg.n_heads,
                n_kv_heads=cfg.n_kv_heads,
                bias=False,
                rope_fraction=0,
                std=std,
                out_std=out_std,
            )
        else:
            self.mixer = MambaMixer(
                d,
                cfg.d_state,
                cfg.d_conv,
                cfg.expand,
                cfg.dt_rank,
                scan=cfg.scan,
                scan_chunk=cfg.scan_chunk,
                norm_eps=cfg.norm_eps,
                std=std,
                out_std=out_std,
            )
        self.norm_ffn = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.ffn: nn.Module
        if is_moe_layer(cfg, i):
            self.ffn = MoEFeedForward(
                TopKRouter(d, cfg.num_experts, cfg.top_k, "softmax", False, cfg.route_skew, std),
                MLPExperts(
                    cfg.num_experts,
                    d,
                    cfg.d_ff,
                    activation="swiglu",
                    bias=False,
                    std_in=std,
                    std_out=out_std,
                ),
                aux={"switch": cfg.aux_switch, "z": cfg.aux_z},
                aux_pooling=cfg.aux_pooling,
            )
        else:
            self.ffn = SwiGLU(d, cfg.d_ff, std, out_std)

    def new_cache(self) -> KVCache | MambaCache:
        return KVCache() if self.is_attention else MambaCache()

    def forward(
        self, x_BSD: Tensor, ctx: MoEContext, cache: KVCache | MambaCache | None = None
    ) -> Tensor:
        x_BSD = x_BSD + self.mixer(self.norm_mix(x_BSD), cache)
        return x_BSD + self.ffn(self.norm_ffn(x_BSD), ctx)


class Jamba(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std)
        self.layers = nn.ModuleList(JambaLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # untied in v0.1
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False, std=cfg.init_std)

    def new_cache(self) -> list[KVCache | MambaCache]:
        """Per layer: a KV cache (attention layers) or conv + SSM state (Mamba layers)."""
        return [layer.new_cache() for layer in self.layers]

    def forward(
        self,
        tokens_BS: Tensor,
        ctx: MoEContext | None = None,
        cache: list[KVCache | MambaCache] | None = None,
    ) -> Tensor:
        ctx = ctx if ctx is not None else MoEContext()
        x_BSD = self.tok_emb(tokens_BS)
        for i, layer in enumerate(self.layers):
            x_BSD = layer(x_BSD, ctx, cache[i] if cache else None)
        ctx.finish()
        return self.lm_head(self.norm_f(x_BSD))


def _validate(cfg: JambaConfig) -> None:
    if not 0 <= cfg.attn_offset < cfg.attn_period:
        raise ValueError(f"attn_offset={cfg.attn_offset} must be in [0, {cfg.attn_period})")
    if not 0 <= cfg.expert_offset < cfg.expert_period:
        raise ValueError(f"expert_offset={cfg.expert_offset} must be in [0, {cfg.expert_period})")


def active_parameters(model: nn.Module) -> int:
    """Parameters a token uses: all, minus the (E − K)/E unchosen share of every MoE bank."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for mod in model.modules():
        if isinstance(mod, MoEFeedForward):
            bank: ExpertBank = mod.experts
            E, K = bank.num_experts, mod.router.top_k
            idle += (E - K) * bank.expert_numel()
    return total - idle


SPEC = register(
    ModelSpec(
        name="jamba",
        config_cls=JambaConfig,
        builder=Jamba,
        presets={
            "tiny": JambaConfig(),
            # AI21's Jamba-v0.1: 52B total, 12B active
            "v0_1": JambaConfig(
                vocab_size=65536,
                d_model=4096,
                n_layers=32,
                n_heads=32,
                n_kv_heads=8,
                d_ff=14336,
                attn_period=8,
                attn_offset=4,
                expert_period=2,
                expert_offset=1,
                num_experts=16,
                top_k=2,
                d_state=16,
                d_conv=4,
                expand=2,
                dt_rank=256,
            ),
        },
    )
)
