"""`optim=` configuration: AdamW with linear warm-up then cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fssdp.rules import above, at_least, between


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine ends at min_lr_ratio · lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
# A negative lr or clip coefficient turns every step into ascent: refused, not clamped.
RULES = (
    # Above 1e30 AdamW's float32 step size overflows (a traceback inside torch.optim).
    above("lr", 0, "e.g. {key}=3e-3", hi=1e30),
    at_least("weight_decay", 0, "e.g. {key}=0.01"),
    between("beta1", 0, 1, "e.g. {key}=0.9", hi_open=True),
    between("beta2", 0, 1, "e.g. {key}=0.95", hi_open=True),
    above("eps", 0, "e.g. {key}=1e-8"),
    at_least("warmup_steps", 0, "e.g. {key}=20"),
    between("min_lr_ratio", 0, 1, "e.g. {key}=0.1"),
    at_least("grad_clip", 0, "e.g. {key}=1.0", note="0 = no clipping", finite=False),
)


def no_weight_decay(name: str, ndim: int) -> bool:
    """Norms and biases are not decayed; stacked expert biases (`b_in [E, H]`) neither."""
    leaf = name.rsplit(".", 1)[-1]
    return ndim < 2 or leaf == "bias" or leaf.startswith("b_")


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig
) -> torch.optim.AdamW:
    """AdamW over `named_params`; group 0 decays, group 1 does not (the FSSDP expert optimizer
    reads its hyper-parameters from group 0)."""
    decay = [p for n, p in named_params if not no_weight_decay(n, p.ndim)]
    no_decay = [p for n, p in named_params if no_weight_decay(n, p.ndim)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set every group's lr for optimizer step `step`; the schedule's state is the step alone."""
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr
