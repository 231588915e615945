"""Run outputs: metrics.jsonl (one JSON object per logged step), tensorboard, progress line.

Only rank 0 writes; the values it writes are already gathered over ranks by the trainer.
Tensorboard gets every scalar, per-rank lists as `key/rank{r}`, phase times as
`phase_time_s/{phase}/{max,mean}`, the expert load of each bank as a histogram over expert ids
(`expert_load/{bank}`, bucket e = [e-0.5, e+0.5]) and, about `figures` times a run, figures
(`add_figure`: banks × expert ids, colour bar, the owning rank in each cell) of the load and of
the replicas per expert (launch/report_load.py).
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

import numpy as np
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
    def __init__(
        self, run_dir: Path, enabled: bool, total_steps: int, progress: bool, figures: int = 8
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.figures = figures  # labelled load figures per run (train.load_figures), 0: none
        self.progress = progress and enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        self._start = time.perf_counter()
        self._initial = 0  # the step this process started from (a resume's)
        self._owners_at: dict[str, list[int]] | None = None  # the latest logged `owners`
        self._figure_part = -1  # the part of the run (1/figures) whose figures were drawn last
        self._writer: SummaryWriter | None = None
        if enabled:
            self._writer = SummaryWriter(log_dir=str(self.tb_dir))

    def truncate_after(self, step: int) -> None:
        """On resume: lines past the checkpoint describe a rolled-back trajectory. Move them to
        metrics.rolled_back.jsonl (nothing is deleted) and keep metrics.jsonl consistent."""
        self._initial = step
        if not self.enabled or not self.path.exists():
            return
        keep, drop = [], []
        for line in self.path.read_text().splitlines():
            try:
                at = json.loads(line).get("step", 0)
            except ValueError:  # a line torn by a kill or a full disk mid-write
                at = step + 1
            (keep if at <= step else drop).append(line)
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
            if key not in ("phase_time_s", "phase_spans", "expert_load", "replicas", "owners"):
                self._scalar(key, value, step)
        self._owners_at = record.get("owners") or self._owners_at
        self._phases(record.get("phase_time_s"), step)
        self._load(record.get("expert_load"), record.get("replicas"), step)
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

    def _phases(self, times: dict[str, list[float]] | None, step: int) -> None:
        assert self._writer is not None
        for phase, per_rank in (times or {}).items():
            if per_rank:
                self._writer.add_scalar(f"phase_time_s/{phase}/max", max(per_rank), step)
                self._writer.add_scalar(
                    f"phase_time_s/{phase}/mean", sum(per_rank) / len(per_rank), step
                )

    def _load(
        self, load: dict[str, list[int]] | None, replicas: dict[str, list[int]] | None, step: int
    ) -> None:
        """Per bank a histogram whose buckets are centred on the expert ids ([e-0.5, e+0.5]),
        and labelled figures (expert ids, owning rank, colour bar) of the load and replicas."""
        from launch.report_load import step_heatmap

        assert self._writer is not None
        for bank, counts in (load or {}).items():
            if sum(counts) > 0:
                c = np.asarray(counts, dtype=np.float64)
                ids = np.arange(len(c), dtype=np.float64)
                self._writer.add_histogram_raw(
                    f"expert_load/{bank}",
                    min=-0.5,
                    max=float(len(c)) - 0.5,
                    num=float(c.sum()),
                    sum=float((ids * c).sum()),
                    sum_squares=float((ids * ids * c).sum()),
                    bucket_limits=(ids + 0.5).tolist(),
                    bucket_counts=c.tolist(),
                    global_step=step,
                )
        # A labelled figure costs 0.1-0.6 s of rank 0's time (the others wait at the next step):
        # drawn at the first logged step, the last, and about every 1/figures of the run between.
        part = step * self.figures // max(1, self.total_steps)
        if self.figures == 0 or (part == self._figure_part and step != self.total_steps):
            return
        self._figure_part = part
        for tag, rows, kind in (
            ("expert_load_heatmap", load, "load"),
            ("replicas_heatmap", replicas, "replicas"),
        ):
            if rows:
                fig = step_heatmap(rows, self._owners_at, kind, step)
                self._writer.add_figure(tag, fig, step, close=False)

    def _print(self, r: dict[str, Any]) -> None:
        """One line per logged step: tqdm's meter (bar, steps, elapsed<ETA, rate) and the step's
        figures. A line, not a live bar: torchrun interleaves ranks' output, logs are files."""
        from tqdm import tqdm

        parts = []
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if r.get("val_bpb") is not None:
            parts.append(f"val_bpb {r['val_bpb']:.3f}")
        elif r.get("val_loss") is not None:
            parts.append(f"val_loss {r['val_loss']:.4f}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:.0f} tok/s")
        if r.get("straggler_ratio") is not None:
            parts.append(f"straggler {r['straggler_ratio']:.2f}")
        meter = tqdm.format_meter(
            r["step"],
            self.total_steps,
            time.perf_counter() - self._start,
            initial=self._initial,  # the rate (and so the ETA) counts this process's steps
            unit="step",
            bar_format="{percentage:3.0f}%|{bar:20}| step {n}/{total} "
            "[{elapsed}<{remaining}, {rate_fmt}]",
        )
        print(" | ".join([meter, *parts]), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
