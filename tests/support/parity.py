"""Train a few steps in-process on every rank and capture losses and full gradients.

The reference is `parallel=none` at world 1; every strategy at every world size must match it
(float64: ≤1e-9 relative). Gradients are captured after synchronisation, before clipping, as
full tensors keyed by the unwrapped model's parameter names.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.build import build_trainer
from launch.dist import DistInfo
from launch.train import compose_config
from models.common.experts import ExpertBank

BASE = [
    "train.dtype=float64",
    "train.global_batch_size=8",
    "train.seq_len=32",
    "train.progress=false",
    "optim.warmup_steps=2",
]


def full_grads(par: Any) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full tensor (zeros where a parameter got none).

    FSDP2's DTensors are assembled by `full_tensor()`; the sharded experts of ep/fssdp (rows of
    the owned experts, `bank.expert_ids`) by summing zero-padded rows over ranks."""
    banks = {m.bank_name: m for m in par.model.modules() if isinstance(m, ExpertBank)}
    out = {}
    for name, p in par.model.named_parameters():
        g = p.grad
        bank = banks.get(name.rsplit(".", 1)[0])
        if bank is not None and bank.expert_ids is not None:
            full = torch.zeros(bank.num_experts, *p.shape[1:], dtype=p.dtype)
            if g is not None:
                full[torch.tensor(bank.expert_ids, dtype=torch.long)] = g.detach()
            if dist.is_initialized():
                dist.all_reduce(full)
            out[name] = full
            continue
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        shape = p.full_tensor().shape if hasattr(p, "full_tensor") else p.shape
        out[name] = torch.zeros(shape, dtype=p.dtype) if g is None else g.detach().clone()
    return {k: out[k] for k in sorted(out)}


def train_capture(
    rank: int, world: int, overrides: list[str], steps: int, probe: Any = None
) -> dict[str, Any]:
    """Train `steps` steps; `probe(trainer)` (every rank) adds what it returns as "probe"."""
    job, _ = compose_config(BASE + [f"train.steps={steps}"] + overrides)
    cfg: Any = OmegaConf.to_object(job)
    info = DistInfo(
        rank, world, rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.device("cpu")
    )
    grads: list[dict[str, torch.Tensor]] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            cfg, info, Path(tmp), on_grads=lambda par, step: grads.append(full_grads(par))
        )
        losses = [trainer.train_step() for _ in range(steps)]
        probed = probe(trainer) if probe is not None else None
    if dist.is_initialized():
        dist.barrier()
    return {
        "loss": [o["loss"] for o in losses],
        "aux": [o["aux_loss"] for o in losses],
        "grads": grads if rank == 0 else None,
        "load": [{k: v.tolist() for k, v in o["load"].items()} for o in losses],
        "probe": probed,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = max(b.norm().item(), 1e-30)
    return (a - b).norm().item() / denom


def assert_matches(ref: dict[str, Any], got: dict[str, Any], tol: float, label: str) -> None:
    for s, (lr, lg) in enumerate(zip(ref["loss"], got["loss"])):
        assert abs(lr - lg) <= tol * abs(lr), f"{label}: loss step {s + 1}: {lg} vs {lr}"
    for s, (lr, lg) in enumerate(zip(ref["aux"], got["aux"])):
        assert abs(lr - lg) <= tol * max(abs(lr), 1e-12), f"{label}: aux step {s + 1}"
    for s, (gr, gg) in enumerate(zip(ref["grads"], got["grads"])):
        assert gr.keys() == gg.keys(), f"{label}: parameter names differ"
        for name in gr:
            err = rel_err(gg[name], gr[name])
            assert err <= tol, f"{label}: grad {name} step {s + 1}: rel err {err:.2e}"
