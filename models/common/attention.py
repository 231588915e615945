"""Causal self-attention with optional RoPE, grouped KV heads and a KV cache.

Legend: B batch, S new positions, P past positions, D model width, H query heads, G kv heads,
Dh head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common.layers import Linear


def rope_frequencies(dim: int, base: float = 10000.0) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def apply_rope(x_BHSd: Tensor, positions_S: Tensor, rot_dim: int, base: float = 10000.0) -> Tensor:
    """Rotate the first `rot_dim` channels of each head (pairs (i, i + rot_dim/2))."""
    if rot_dim == 0:
        return x_BHSd
    inv = rope_frequencies(rot_dim, base).to(x_BHSd.device)
    ang_Sf = positions_S.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = ang_Sf.cos().to(x_BHSd.dtype), ang_Sf.sin().to(x_BHSd.dtype)
    rot, rest = x_BHSd[..., :rot_dim], x_BHSd[..., rot_dim:]
    x1, x2 = rot[..., : rot_dim // 2], rot[..., rot_dim // 2 :]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


@dataclass
class KVCache:
    """Keys/values of past positions for incremental decoding ([B, G, P, Dh] each)."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k_BGSd: Tensor, v_BGSd: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is not None:
            k_BGSd = torch.cat([self.k, k_BGSd], dim=2)
            v_BGSd = torch.cat([self.v, v_BGSd], dim=2)
        self.k, self.v = k_BGSd, v_BGSd
        return k_BGSd, v_BGSd


def causal_attention(
    q_BHSd: Tensor, k_BGPd: Tensor, v_BGPd: Tensor, scale: float | None = None
) -> Tensor:
    """Attention of S new queries over P ≥ S keys, the queries being the last S positions."""
    H, G = q_BHSd.shape[1], k_BGPd.shape[1]
    if G != H:
        k_BGPd = k_BGPd.repeat_interleave(H // G, dim=1)
        v_BGPd = v_BGPd.repeat_interleave(H // G, dim=1)
    S, P = q_BHSd.shape[2], k_BGPd.shape[2]
    if S == P:
        return F.scaled_dot_product_attention(q_BHSd, k_BGPd, v_BGPd, is_causal=True, scale=scale)
    pos_q = torch.arange(P - S, P, device=q_BHSd.device)[:, None]
    mask_SP = pos_q >= torch.arange(P, device=q_BHSd.device)[None, :]
    return F.scaled_dot_product_attention(q_BHSd, k_BGPd, v_BGPd, attn_mask=mask_SP, scale=scale)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention; RoPE on `rope_fraction` of each head."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        rope_fraction: float = 0.0,
        std: float | None = None,
        out_std: float | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={n_heads} not divisible by n_kv_heads={self.n_kv_heads}")
        self.d_head = d_model // n_heads
        self.rot_dim = int(self.d_head * rope_fraction) // 2 * 2
        kv = self.n_kv_heads * self.d_head
        std = std if std is not None else 1.0 / math.sqrt(d_model)
        out_std = out_std if out_std is not None else std
        # normal(0, std) weights, zero biases ([Note: init protocol] in models/common/layers.py)
        self.q = Linear(d_model, d_model, bias=bias, std=std)
        self.kv = Linear(d_model, 2 * kv, bias=bias, std=std)
        self.o = Linear(d_model, d_model, bias=bias, std=out_std)

    def forward(self, x_BSD: Tensor, cache: KVCache | None = None) -> Tensor:
        B, S, D = x_BSD.shape
        past = cache.length if cache is not None else 0
        q = self.q(x_BSD).view(B, S, self.n_heads, self.d_head).transpose(1, 2)
        k, v = self.kv(x_BSD).view(B, S, 2, self.n_kv_heads, self.d_head).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.rot_dim:
            pos_S = torch.arange(past, past + S, device=x_BSD.device)
            q, k = apply_rope(q, pos_S, self.rot_dim), apply_rope(k, pos_S, self.rot_dim)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = causal_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, S, D))
