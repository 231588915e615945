"""What a run prints (rank 0): at start the resolved config's key lines and the parameter
counts; at the end where things are and what the run saw."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from launch.checkpoint import latest_checkpoint
from launch.errors import UserError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def print_summary(run_dir: Path, history: list[dict[str, Any]]) -> None:
    first, last = history[0], history[-1]
    lines = [
        "",
        f"done: {last['step']} steps; loss {first['loss']:.4f} -> {last['loss']:.4f}",
    ]
    if "val_bpb" in last:
        lines.append(f"validation: {last['val_bpb']:.3f} bits per byte")
    straggler = [r["straggler_ratio"] for r in history if r.get("straggler_ratio") is not None]
    if straggler:
        lines.append(
            f"straggler ratio (max/mean expert time over ranks): mean "
            f"{sum(straggler) / len(straggler):.2f}, last {straggler[-1]:.2f}"
        )
    comm = last.get("comm_bytes") or {}
    if any(comm.values()):
        lines.append(
            "bytes moved last step: "
            + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in comm.items() if v)
        )
    lines.append(f"throughput: {last['tokens_per_s']:.0f} tokens/s")
    found = latest_checkpoint(run_dir / "checkpoints")
    lines += [
        f"run directory: {run_dir.resolve()}",
        f"  metrics:     {(run_dir / 'metrics.jsonl').resolve()}",
        f"  config:      {(run_dir / 'config.yaml').resolve()}",
        f"  tensorboard: {(run_dir / 'tensorboard').resolve()}",
        f"  checkpoint:  {found[1].resolve() if found else '(none)'}",
        f"open tensorboard: {Path(sys.executable).parent / 'tensorboard'} --logdir "
        f"{(run_dir / 'tensorboard').resolve()}",
    ]
    print("\n".join(lines), flush=True)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def preset_of(model_cfg: Any) -> str:
    """The zoo preset a model config is, or the nearest one and the fields that differ."""
    from models.registry import model_presets

    best: tuple[int, str, list[str]] | None = None
    for name, preset in model_presets().items():
        if type(preset) is not type(model_cfg):
            continue
        diff = [
            f"{f.name}={getattr(model_cfg, f.name)}"
            for f in dataclasses.fields(preset)
            if getattr(preset, f.name) != getattr(model_cfg, f.name)
        ]
        if best is None or len(diff) < best[0]:
            best = (len(diff), name, diff)
    if best is None:
        return str(getattr(model_cfg, "family", "?"))
    _, name, diff = best
    return name + (f" with {', '.join(diff)}" if diff else "")


def start_lines(cfg: Any, world: int, run_dir: Path) -> list[str]:
    """The resolved config in a few lines, with total / active parameters (a meta build)."""
    from models.common.params import parameter_counts
    from models.registry import build_model

    try:
        total, active = parameter_counts(build_model(cfg.model, device="meta"))
    except ValueError as e:  # an impossible model config (e.g. top_k > num_experts)
        raise UserError(f"model config: {e}") from e
    t, o, d, p = cfg.train, cfg.optim, cfg.data, cfg.parallel
    tokens = t.global_batch_size * t.seq_len
    data = d.name + (f" {d.path}" if d.path else "")
    every = [f"log every {t.log_every}"]
    every += [f"validate every {t.val_every}"] if t.val_every else ["validate at the end"]
    if not t.checkpoints:
        every += ["no checkpoints"]
    else:
        every += [f"checkpoint every {t.ckpt_every}"] if t.ckpt_every else ["checkpoint at the end"]
    knobs = f" (plan_mode {p.plan_mode}, memory_cap {p.memory_cap})"
    return [
        f"model:    {preset_of(cfg.model)}: {_count(total)} parameters, {_count(active)} active "
        "per token",
        f"parallel: {p.strategy}, world {world}" + (knobs if p.strategy == "fssdp" else ""),
        f"data:     {data} (vocab {cfg.model.vocab_size}), seed {cfg.seed}",
        f"train:    {t.steps} steps x {t.global_batch_size} sequences x {t.seq_len} tokens "
        f"({tokens} tokens a step), {t.dtype}; {', '.join(every)}",
        f"optim:    {o.name} ({o.impl}), lr {o.lr:g}, warm-up {o.warmup_steps} steps then cosine "
        f"to {o.min_lr_ratio:g}x, weight decay {o.weight_decay:g}, grad clip {o.grad_clip:g}",
        f"run dir:  {run_dir}",
    ]
