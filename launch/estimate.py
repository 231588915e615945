"""Memory of one rank of a world-N job, before launching it.

    python -m launch.estimate --world N [--rank R] [--ranks-per-node K] [--json FILE] \\
        <the same hydra overrides as launch.train>

Builds the real parallelised model and optimizer state of rank R of a world-N job in this
process, on a fake process group (torch's `fake` backend, as torchtitan's dry runs use: no
other ranks, collectives are no-ops), allocating only what that rank holds: FSDP2 shards of the
dense parameters, the owned expert rows, the optimizer state (initialised by one zero-gradient
step). Prints, and writes with --json, per-rank bytes:

    params_bytes   parameters this rank holds
    grads_bytes    their gradients (one per parameter, same dtype; counted, not allocated)
    optim_bytes    optimizer state
    replica_bytes  fssdp: the replica capacity, values and gradients of parallel.memory_cap
                   experts per bank (0 for other strategies)
    total_bytes    the sum: what the trainer logs per rank as model_state_bytes

plus the model's total and active parameter counts (models/common/params.py). Activations are
not included (they depend on batch, sequence and checkpointing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.errors import UserError, fail


def _fake_group(rank: int, world: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * t.element_size()


@torch.no_grad()
def _init_state(opt: torch.optim.Optimizer) -> None:
    """One step with zero gradients creates every state tensor (lr 0: values unchanged)."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
        for p in g["params"]:
            p.grad = None


def estimate(overrides: list[str], world: int, rank: int, ranks_per_node: int) -> dict[str, Any]:
    """Per-rank bytes of the job `overrides` at world size `world` (see the module docstring)."""
    from fssdp.api import parallelize
    from launch.optim import build_optimizer
    from launch.train import compose_config
    from launch.trainer import param_dtype
    from launch.validation import validate
    from models.common.params import parameter_counts
    from models.registry import build_model, spec_for

    if world < 1 or not 0 <= rank < world:
        raise UserError(f"--world {world} --rank {rank}: need world ≥ 1 and 0 ≤ rank < world")
    job, _ = compose_config(overrides)
    cfg: Any = OmegaConf.to_object(job)
    notes = []
    if cfg.train.global_batch_size % world:  # launch.train refuses it; model state ignores it
        notes.append(
            f"train.global_batch_size={cfg.train.global_batch_size} does not split over {world}"
            " ranks: launch.train would refuse it (model state does not depend on it)"
        )
        cfg.train.global_batch_size = world
    validate(cfg, world)
    try:
        model = build_model(cfg.model, device="meta", dtype=param_dtype(cfg.train))
    except ValueError as e:
        raise UserError(f"model config: {e}") from e
    total, active = parameter_counts(model)
    _fake_group(rank, world)
    try:
        units = spec_for(cfg.model).fsdp_units(model)
        par = parallelize(model, cfg.parallel, units=units, ranks_per_node=ranks_per_node or world)
    except ValueError as e:
        raise UserError(str(e)) from e
    par.materialize(torch.device("cpu"), seed=None, finish=False)
    opt = build_optimizer(par.named_optimizer_params(), cfg.optim)
    par.attach(opt)
    _init_state(opt)
    params = sum(_bytes(p) for _, p in par.named_optimizer_params())
    optim = sum(
        _bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim
    )
    replica = par.state_bytes() - 2 * params - optim
    out = {
        "world": world,
        "rank": rank,
        "strategy": cfg.parallel.strategy,
        "model": getattr(cfg.model, "family", "?"),
        "params_bytes": params,
        "grads_bytes": params,
        "optim_bytes": optim,
        "replica_bytes": replica,
        "total_bytes": 2 * params + optim + replica,
        "total_params": total,
        "active_params": active,
        "notes": notes,
    }
    dist.destroy_process_group()
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m launch.estimate",
        description="Per-rank memory of a world-N job (fake process group; nothing launched).",
    )
    ap.add_argument("--world", type=int, required=True, help="world size of the job")
    ap.add_argument("--rank", type=int, default=0, help="which rank to build (default 0)")
    ap.add_argument("--ranks-per-node", type=int, default=0, help="topology (default: one node)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as for launch.train")
    args = ap.parse_args(argv)
    try:
        out = estimate(args.overrides, args.world, args.rank, args.ranks_per_node)
    except UserError as e:
        fail(str(e))
    print(
        f"{out['model']} under parallel={out['strategy']}, rank {out['rank']} of {out['world']}: "
        f"{_count(out['total_params'])} parameters ({_count(out['active_params'])} active)"
    )
    for note in out["notes"]:
        print(f"  note: {note}")
    for key in ("params_bytes", "grads_bytes", "optim_bytes", "replica_bytes", "total_bytes"):
        print(f"  {key:14s} {out[key]:>16,d}  ({_gib(out[key])})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    from launch.leave import run_main

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_main(lambda: main(sys.argv[1:]))
