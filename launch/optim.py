"""`optim=` configuration: a torch.optim optimizer (AdamW by default) and the learning-rate
schedule, linear warm-up then cosine decay, as a `torch.optim.lr_scheduler.LambdaLR`.

Experts are ordinary registered parameters (each rank holds its rows), so any torch optimizer
steps them; their per-row state moves with ownership ([Note: per-row optimizer state] in
fssdp/expert_params.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from fssdp.rules import Rule, above, at_least, between, one_of
from launch.errors import UserError

# name -> (torch.optim class name, whether torch has a fused kernel for it)
OPTIMIZERS = {"adamw": ("AdamW", True), "adam": ("Adam", True), "sgd": ("SGD", True),
              "adafactor": ("Adafactor", False)}  # fmt: skip
IMPLS = ("single", "foreach", "fused")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd | adafactor (torch.optim classes)
    # single: a loop over parameters (the reference); foreach: multi-tensor kernels;
    # fused: one fused kernel (adamw, adam, sgd only)
    impl: str = "single"
    lr: float = 3e-3  # peak learning rate, reached after the warm-up
    weight_decay: float = 0.01  # decoupled for adamw/adafactor; not on norms and biases
    beta1: float = 0.9  # adamw/adam
    beta2: float = 0.95  # adamw/adam
    eps: float = 1e-8  # adamw/adam
    momentum: float = 0.9  # sgd
    warmup_steps: int = 20  # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine ends at min_lr_ratio · lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off


def _impl_ok(value: Any, cfg: Any) -> bool:
    fused = OPTIMIZERS.get(cfg.name, ("", False))[1]
    return value in IMPLS and (value != "fused" or fused)


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
# A negative lr or clip coefficient turns every step into ascent: refused, not clamped.
RULES = (
    one_of("name", OPTIMIZERS, "e.g. {key}=adamw"),
    Rule(
        "impl",
        _impl_ok,
        "single | foreach | fused; fused only for " + ", ".join(n for n, v in OPTIMIZERS.items()
                                                              if v[1]),  # fmt: skip
        "e.g. {key}=foreach",
        "bogus",
    ),
    # Above 1e30 AdamW's float32 step size overflows (a traceback inside torch.optim).
    above("lr", 0, "e.g. {key}=3e-3", hi=1e30),
    at_least("weight_decay", 0, "e.g. {key}=0.01"),
    between("beta1", 0, 1, "e.g. {key}=0.9", hi_open=True),
    between("beta2", 0, 1, "e.g. {key}=0.95", hi_open=True),
    above("eps", 0, "e.g. {key}=1e-8"),
    between("momentum", 0, 1, "e.g. {key}=0.9", hi_open=True),
    at_least("warmup_steps", 0, "e.g. {key}=20"),
    between("min_lr_ratio", 0, 1, "e.g. {key}=0.1"),
    at_least("grad_clip", 0, "e.g. {key}=1.0", note="0 = no clipping", finite=False),
)


def no_weight_decay(name: str, ndim: int) -> bool:
    """Norms and biases are not decayed; stacked expert biases (`b_in [E, H]`) neither."""
    leaf = name.rsplit(".", 1)[-1]
    return ndim < 2 or leaf == "bias" or leaf.startswith("b_")


def _kwargs(cfg: OptimConfig) -> dict[str, Any]:
    """The constructor arguments of `cfg.name` besides the parameter groups."""
    impl = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    kw: dict[str, Any] = {"lr": cfg.lr, **impl[cfg.impl]}
    if cfg.name in ("adamw", "adam"):
        kw.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    elif cfg.name == "sgd":
        kw.update(momentum=cfg.momentum)
    return kw


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """`cfg.name` over `named_params`; group 0 decays, group 1 does not.

    Multi-tensor kernels (`impl=foreach|fused`) cannot take FSDP2's DTensors and plain tensors
    (the sharded experts' rows under ep/fssdp) in one call, and torch batches per param group:
    there, each group is split by kind (DTensors first), four groups in all. `impl=single`
    keeps two, the layout of earlier checkpoints."""
    decay = [p for n, p in named_params if not no_weight_decay(n, p.ndim)]
    no_decay = [p for n, p in named_params if no_weight_decay(n, p.ndim)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kinds = {isinstance(p, DTensor) for _, p in named_params}
    sharded_2d = any(isinstance(p, DTensor) and p.ndim > 1 for _, p in named_params)
    if cfg.name == "adafactor" and sharded_2d:
        raise UserError(
            "optim.name=adafactor cannot update FSDP2-sharded parameters (torch's Adafactor "
            "squares a row norm in place on a sharded DTensor, which torch refuses): use "
            "parallel=ddp or none with adafactor, or optim.name=adamw|adam|sgd"
        )
    if cfg.impl != "single" and len(kinds) == 2:
        groups = [
            {**g, "params": [p for p in g["params"] if isinstance(p, DTensor) == dt]}
            for dt in (True, False)
            for g in groups
        ]
    cls = getattr(torch.optim, OPTIMIZERS[cfg.name][0])
    return cls(groups, **_kwargs(cfg))


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set every group's lr for optimizer step `step` (for loops without a scheduler object:
    perf/deepspeed_moe.py)."""
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig) -> LambdaLR:
    """Warm-up + cosine as a LambdaLR: at optimizer step s (0-based, before `scheduler.step()`)
    every group's lr is cfg.lr · lr_factor(s), the values `set_lr` gives. The lambda is a plain
    function, so it stays out of the scheduler's state_dict: the schedule is the config's."""

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, cfg)

    for group in opt.param_groups:
        group["lr"] = cfg.lr  # base_lrs: the config's lr
    sched = LambdaLR(opt, factor)
    # The param groups are part of the checkpoint, key by key: LambdaLR's `initial_lr` would make
    # every older checkpoint fail the strict load, and the scheduler keeps base_lrs itself.
    for group in opt.param_groups:
        group.pop("initial_lr", None)
    return sched


def scheduler_state(sched: LambdaLR, step: int, loading: Path | None = None) -> dict[str, Any]:
    """The checkpoint's `scheduler` entry: the step (all that checkpoints from before the
    LambdaLR hold) and the LambdaLR's state. When `loading` a checkpoint without the latter,
    the step alone (the strict load refuses entries a checkpoint lacks)."""
    if loading is not None and not _holds_scheduler(loading):
        return {"step": step}
    return {"step": step, "lr_scheduler": sched.state_dict()}


def _holds_scheduler(path: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - unreadable: the load that follows names the problem
        return True
    return any(k.startswith("scheduler.lr_scheduler") for k in keys)


def restore_scheduler(sched: LambdaLR, saved: dict[str, Any]) -> None:
    """Continue the schedule at the saved step. A checkpoint from before the LambdaLR holds only
    `step`; either way the base lr is this run's `optim.lr` (a resume with a lower lr after a
    divergence must take effect), and the groups' lr is set for the next step."""
    step = int(saved["step"])
    state = {**sched.state_dict(), **(saved.get("lr_scheduler") or {}), "_step_count": step + 1}
    state.update(last_epoch=step, base_lrs=list(sched.base_lrs))
    sched.load_state_dict(state)
    lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports
