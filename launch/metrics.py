"""Run outputs: metrics.jsonl (one JSON object per logged step), tensorboard, progress line.

Only rank 0 writes; the values it writes are already gathered over ranks by the trainer.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def expert_load_imbalance(load: dict[str, Any]) -> float | None:
    """max/mean tokens per expert, averaged over banks (1.0 = perfectly even)."""
    ratios = []
    for counts in load.values():
        c = counts.double()
        if c.sum() > 0:
            ratios.append((c.max() / c.mean()).item())
    return sum(ratios) / len(ratios) if ratios else None


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, progress: bool) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress and enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        self._start = time.perf_counter()
        self._writer: SummaryWriter | None = None
        if enabled:
            self._writer = SummaryWriter(log_dir=str(self.tb_dir))

    def truncate_after(self, step: int) -> None:
        """On resume: lines past the checkpoint describe a rolled-back trajectory. Move them to
        metrics.rolled_back.jsonl (nothing is deleted) and keep metrics.jsonl consistent."""
        if not self.enabled or not self.path.exists():
            return
        keep, drop = [], []
        for line in self.path.read_text().splitlines():
            (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
        if drop:
            with open(self.path.with_name("metrics.rolled_back.jsonl"), "a") as f:
                f.write("\n".join(drop) + "\n")
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        assert self._writer is not None
        for key, value in record.items():
            self._scalar(key, value, step)
        if self.progress:
            self._print(record)

    def _scalar(self, key: str, value: Any, step: int) -> None:
        assert self._writer is not None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{key}/rank{i}", v, step)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{key}/{k}", v, step)

    def _print(self, r: dict[str, Any]) -> None:
        width = 24
        done = int(width * r["step"] / max(1, self.total_steps))
        bar = "#" * done + "." * (width - done)
        parts = [f"[{bar}] step {r['step']}/{self.total_steps}"]
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if r.get("val_bpb") is not None:
            parts.append(f"val_bpb {r['val_bpb']:.3f}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:.0f} tok/s")
        if r.get("straggler_ratio") is not None:
            parts.append(f"straggler {r['straggler_ratio']:.2f}")
        parts.append(f"{time.perf_counter() - self._start:.0f}s")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
