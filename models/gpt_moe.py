"""GPT-MoE: pre-LN GPT whose every FFN is a top-2 MoE (the Hecate paper's benchmark model).

Follows the Hecate paper (arXiv 2502.02581) for the architecture (expert hidden 2·d, GELU,
top-2 GShard-style softmax gating without renormalisation, Switch aux 0.01). The paper has no
public code; the Switch loss defaults to GShard's per-layer form (one loss per MoE layer,
summed: `aux_pooling=per_layer`, as GShard, Megatron-LM and DeepSpeed-MoE, the systems the paper
compares with, do); `aux_pooling=pooled` gives transformers' pooled form.

Legend: B batch, S sequence, D model width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.common.attention import CausalSelfAttention, KVCache
from models.common.context import MoEContext
from models.common.experts import MLPExperts
from models.common.layers import Embedding
from models.common.moe import AUX_POOLING, MoEFeedForward
from models.common.router import TopKRouter
from models.common.rules import Rule, above, at_least, multiple_of, one_of, up_to
from models.spec import ModelSpec, register


@dataclass
class GPTMoEConfig:
    family: str = "gpt_moe"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 0  # 0 → 2·d_model (the paper's setting)
    max_seq_len: int = 1024
    aux_switch: float = 0.01
    aux_pooling: str = "per_layer"  # per_layer (GShard) | pooled (transformers' Mixtral)
    aux_z: float = 0.0
    route_skew: float = 0.0
    init_std: float = 0.02
    RULES: ClassVar[tuple[Rule, ...]] = ()  # the table below


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
RULES = GPTMoEConfig.RULES = (
    one_of("family", ("gpt_moe",), "choose the family with model=<family>_<size>, not {key}"),
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
    at_least("num_experts", 1, "e.g. {key}=8"),
    up_to(
        "top_k",
        "num_experts",
        "pick 1 … model.num_experts={cfg.num_experts}, or raise model.num_experts",
    ),
    at_least("expert_hidden", 0, "e.g. {key}=0", note="0 = 2·d_model"),
    at_least("max_seq_len", 1, "e.g. {key}=1024"),
    at_least("aux_switch", 0, "e.g. {key}=0.01 (0 = off)"),
    one_of("aux_pooling", AUX_POOLING),
    at_least("aux_z", 0, "e.g. {key}=0 (off)"),
    at_least("route_skew", 0, "e.g. {key}=0 (off)", note="a Zipf exponent"),
    above("init_std", 0, "e.g. {key}=0.02"),
)


class GPTMoEBlock(nn.Module):
    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        d, std = cfg.d_model, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, cfg.n_heads, std=std, out_std=out_std)
        self.ln2 = nn.LayerNorm(d)
        hidden = cfg.expert_hidden or 2 * d
        self.moe = MoEFeedForward(
            TopKRouter(d, cfg.num_experts, cfg.top_k, "softmax", False, cfg.route_skew, std=std),
            MLPExperts(cfg.num_experts, d, hidden, activation="gelu", std_in=std, std_out=out_std),
            aux={"switch": cfg.aux_switch, "z": cfg.aux_z},
            aux_pooling=cfg.aux_pooling,
        )

    def forward(self, x_BSD: Tensor, ctx: MoEContext, cache: KVCache | None = None) -> Tensor:
        x_BSD = x_BSD + self.attn(self.ln1(x_BSD), cache)
        return x_BSD + self.moe(self.ln2(x_BSD), ctx)


class GPTMoE(nn.Module):
    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std)
        self.pos_emb = Embedding(cfg.max_seq_len, cfg.d_model, std=cfg.init_std)
        self.blocks = nn.ModuleList(GPTMoEBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(
        self, tokens_BS: Tensor, ctx: MoEContext | None = None, cache: list[KVCache] | None = None
    ) -> Tensor:
        ctx = ctx if ctx is not None else MoEContext()
        past = cache[0].length if cache else 0
        S = tokens_BS.shape[1]
        if past + S > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {past + S} exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        pos_S = torch.arange(past, past + S, device=tokens_BS.device)
        x_BSD = self.tok_emb(tokens_BS) + self.pos_emb(pos_S)
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, ctx, cache[i] if cache else None)
        ctx.finish()
        return self.ln_f(x_BSD) @ self.tok_emb.weight.T  # tied LM head


SPEC = register(
    ModelSpec(
        name="gpt_moe",
        config_cls=GPTMoEConfig,
        builder=GPTMoE,
        presets={
            "tiny": GPTMoEConfig(),
            # CPU-sized benchmark model (perf/): d 256, 8 layers, 16 experts, seq 256
            "bench": GPTMoEConfig(
                d_model=256, n_layers=8, n_heads=8, num_experts=16, max_seq_len=512
            ),
            "s": GPTMoEConfig(
                vocab_size=50257,
                d_model=768,
                n_layers=12,
                n_heads=12,
                num_experts=64,
                max_seq_len=2048,
            ),
            "l": GPTMoEConfig(
                vocab_size=50257,
                d_model=1536,
                n_layers=12,
                n_heads=16,
                num_experts=64,
                max_seq_len=2048,
            ),
        },
    )
)
