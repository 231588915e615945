"""Train a few steps in-process on every rank and capture losses and full gradients.

The reference is `parallel=none` at world 1; every strategy at every world size must match it
(float64: ≤1e-9 relative). Gradients are captured after synchronisation, before clipping, as
full tensors keyed by the unwrapped model's parameter names.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from launch.build import build_trainer
from launch.dist import DistInfo
from launch.train import compose_config
from models.common.experts import ExpertBank
from tests.support.shared import SESSION_CACHE, once

BASE = [
    "train.dtype=float64",
    "train.global_batch_size=8",
    "train.seq_len=32",
    "train.progress=false",
    "optim.warmup_steps=2",
]


def job_config(overrides: list[str]) -> Any:
    """The config object of `overrides` (hydra compose, then `OmegaConf.to_object`), composed
    once per test session (`once`, in `SESSION_CACHE`): every rank of a run composes the same
    overrides, and the parity tests run one case list at worlds 1, 2 and 4. A compose costs
    ~0.25 s of CPU, the size of a tiny model's build; every caller gets its own copy (a
    trainer may change its config)."""
    compose = lambda: OmegaConf.to_object(compose_config(overrides)[0])  # noqa: E731
    cache = os.environ.get(SESSION_CACHE)
    if not cache:
        return compose()
    key = "config-" + hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:24]
    return once(Path(cache), key, compose)


def _part(p: Any, g: torch.Tensor | None, rank: int) -> tuple[Any, torch.Tensor | None]:
    """(where in the full tensor this rank's part goes, the part, or None: nothing from here).
    Zeros elsewhere and the parts summed over ranks give the full gradient exactly."""
    if not isinstance(p, DTensor):
        return (), g if rank == 0 else None  # replicated (or world 1): rank 0's copy
    if g is None or p.device_mesh.get_coordinate() is None:
        return (), None
    if not all(isinstance(x, Shard | Replicate) for x in g.placements):
        full = g.full_tensor()  # e.g. Partial: assembled by DTensor, on every rank
        return (), full if rank == 0 else None
    coord = p.device_mesh.get_coordinate()
    if any(c and isinstance(x, Replicate) for c, x in zip(coord, g.placements)):
        return (), None  # a replica: the copy at coordinate 0 is the one summed
    shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, g.placements)
    return tuple(slice(o, o + n) for o, n in zip(off, shape)), g.to_local()


def full_grads(par: Any) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full tensor (zeros where a parameter got none).

    FSDP2's DTensor shards and the sharded experts of ep/fssdp (rows of the owned experts,
    `bank.expert_ids`) are written into zero tensors of the full shape and summed over ranks
    in one all-reduce (one `full_tensor()` per parameter was most of a parity test's time);
    replicated gradients come from rank 0. The sum only adds zeros, so it is exact."""
    banks = {m.bank_name: m for m in par.model.modules() if isinstance(m, ExpertBank)}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out, dtypes = {}, {}
    for name, p in par.model.named_parameters():
        g = None if p.grad is None else p.grad.detach()
        bank = banks.get(name.rsplit(".", 1)[0])
        if bank is not None and bank.expert_ids is not None:
            shape = (bank.num_experts, *p.shape[1:])
            where: Any = torch.tensor(bank.expert_ids, dtype=torch.long)
        else:
            shape, (where, g) = p.shape, _part(p, g, rank)
        full = torch.zeros(shape, dtype=torch.float64)
        if g is not None:
            full[where] = g.to(torch.float64)
        out[name], dtypes[name] = full, p.dtype
    if world > 1:
        flat = torch.cat([t.reshape(-1) for t in out.values()])
        dist.all_reduce(flat)
        parts = flat.split([t.numel() for t in out.values()])
        out = {k: v.view_as(t) for (k, t), v in zip(out.items(), parts)}
    return {k: out[k].to(dtypes[k]) for k in sorted(out)}


def train_capture(
    rank: int, world: int, overrides: list[str], steps: int, probe: Any = None
) -> dict[str, Any]:
    """Train `steps` steps; `probe(trainer)` (every rank) adds what it returns as "probe"."""
    cfg = job_config(BASE + [f"train.steps={steps}"] + overrides)
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
