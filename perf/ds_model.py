"""GPT-MoE with DeepSpeed-MoE's layer (`deepspeed.moe.layer.MoE`) in place of our MoE FFN.

Everything but the FFN is ours (models/gpt_moe.py: embeddings, attention, norms, tied head), built
from the same config and seed, and the DeepSpeed layer starts from the same weights: its gate
gets our router's weight, its local experts (GELU MLP d→2d→d with biases) get our experts'
slices, so both systems start from one model and see the same routing at step 1.

Legend: B batch, S sequence, D model width, E experts, W ranks (= DeepSpeed's ep_size).

[Note: forced skew in DeepSpeed's gate]
`model.route_skew` adds a fixed Zipf bias to our router's logits. DeepSpeed's `TopKGate` builds
its logits itself (a bias-free linear) and hands them to the module function `top2gating`, so the
bias is added by wrapping that function (`install_skew`); nothing else in DeepSpeed changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common.context import MoEContext
from models.common.router import skew_bias
from models.gpt_moe import GPTMoE, GPTMoEConfig


class GeluMLP(nn.Module):
    """One expert: GELU(x·W_in + b_in)·W_out + b_out, as `MLPExperts(activation="gelu")`."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, h)
        self.fc_out = nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class ExpertClock:
    """Seconds spent in the experts' forward this step (DeepSpeed's `Experts` module)."""

    def __init__(self) -> None:
        self.step_s = 0.0
        self._t0 = 0.0

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: self._start())
        module.register_forward_hook(lambda *_: self._stop())

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        self.step_s += time.perf_counter() - self._t0

    def take(self) -> float:
        s, self.step_s = self.step_s, 0.0
        return s


class DeepSpeedFFN(nn.Module):
    """Our MoEFeedForward's call signature around DeepSpeed's MoE layer."""

    def __init__(self, moe: nn.Module, aux_coef: float, bank_name: str) -> None:
        super().__init__()
        self.moe = moe
        self.aux_coef = aux_coef
        self.bank_name = bank_name

    def forward(self, x_BSD: Tensor, ctx: MoEContext) -> Tensor:
        y_BSD, l_aux, counts_E = self.moe(x_BSD)
        if self.aux_coef:
            ctx.add_aux("switch", self.aux_coef * l_aux)
        ctx.add_load(self.bank_name, counts_E)
        return y_BSD


def _copy_experts(ours: nn.Module, ds_moe: nn.Module, first: int) -> None:
    """DeepSpeed's local experts take our experts first, first+1, …"""
    for i, ex in enumerate(ds_moe.deepspeed_moe.experts.deepspeed_experts):
        e = first + i
        ex.fc_in.weight.copy_(ours.w_in[e].T)
        ex.fc_in.bias.copy_(ours.b_in[e])
        ex.fc_out.weight.copy_(ours.w_out[e].T)
        ex.fc_out.bias.copy_(ours.b_out[e])


@torch.no_grad()
def build_ds_gpt_moe(cfg: GPTMoEConfig, rank: int, world: int) -> tuple[GPTMoE, ExpertClock]:
    """Our GPT-MoE (seeded by the caller) with every block's MoE swapped for DeepSpeed's."""
    from deepspeed.moe.layer import MoE

    model = GPTMoE(cfg)
    clock = ExpertClock()
    E, d = cfg.num_experts, cfg.d_model
    if E % world:
        raise ValueError(f"DeepSpeed-MoE needs num_experts={E} divisible by world size {world}")
    for i, block in enumerate(model.blocks):
        ours = block.moe
        ds = MoE(
            hidden_size=d,
            expert=GeluMLP(d, cfg.expert_hidden or 2 * d),
            num_experts=E,
            ep_size=world,
            k=cfg.top_k,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,  # deterministic top-2, as our router
        )
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        _copy_experts(ours.experts, ds, rank * (E // world))
        clock.attach(ds.deepspeed_moe.experts)
        block.moe = DeepSpeedFFN(ds, cfg.aux_switch, f"blocks.{i}.moe.experts")
    return model, clock


def install_skew(num_experts: int, route_skew: float) -> None:
    """Add the fixed Zipf bias to DeepSpeed's top-2 gate logits ([Note: forced skew …])."""
    if not route_skew:
        return
    from deepspeed.moe import sharded_moe

    bias_E = skew_bias(num_experts, route_skew).float()
    original: Callable[..., Any] = sharded_moe.top2gating

    def skewed(logits: Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(logits + bias_E.to(logits), *args, **kwargs)

    sharded_moe.top2gating = skewed


class A2AMeter:
    """Bytes this rank sends in DeepSpeed's token all-to-alls (forward and backward)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.sent = 0

    def install(self) -> None:
        from deepspeed.moe import sharded_moe

        inner = sharded_moe._AllToAll
        meter = self

        class Counted:
            @staticmethod
            def apply(group: Any, x: Tensor) -> Tensor:
                meter.sent += x.numel() * x.element_size() * (meter.world - 1) // meter.world
                return inner.apply(group, x)

        # _AllToAll.backward calls the module global again, so backward is counted too.
        sharded_moe._AllToAll = Counted

    def take(self) -> int:
        n, self.sent = self.sent, 0
        return n
