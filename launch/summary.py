"""The closing summary a run prints: where things are, and what the run saw."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from launch.checkpoint import latest_checkpoint


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
