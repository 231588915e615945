"""What a run records for profiling besides metrics: phase figures gathered over ranks, a
torch.profiler trace of chosen steps, and the routing trace for the simulator.

- `gather_phases`: every rank's `StepPhases` (fssdp/phases.py) → the metrics.jsonl keys
  `phase_time_s` {phase: [seconds per rank]} and `phase_spans` [per rank: [phase, start, end,
  depth], seconds from that rank's step start].
- `StepProfiler`: `train.profile_steps=[a,b]` → `<run>/profile/rank{r}.json` (chrome trace).
- `TraceRecorder`: `train.routing_trace=true` → `<run>/routing_trace.jsonl` (format: the
  docstring of launch/routing_trace.py), written by rank 0 every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fssdp.phases import PHASES, StepPhases
from launch.routing_trace import TraceWriter


def gather_phases(mine: StepPhases) -> dict[str, Any]:
    """Every rank's phases of this step, in rank order (every rank calls; small objects)."""
    spans = [[name, round(a, 6), round(b, 6), depth] for name, a, b, depth in mine.spans]
    local = {"times": mine.times, "spans": spans}
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    else:
        everyone = [local]
    names = [p for p in PHASES if any(p in r["times"] for r in everyone)]
    names += sorted({p for r in everyone for p in r["times"]} - set(names))
    return {
        "phase_time_s": {p: [round(r["times"].get(p, 0.0), 6) for r in everyone] for p in names},
        "phase_spans": [r["spans"] for r in everyone],
    }


class StepProfiler:
    """torch.profiler over the steps a..b (1-based, inclusive); one chrome trace per rank."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.path = run_dir / "profile" / f"rank{rank}.json"
        self.device = device
        self._prof: Any = None
        self._range: Any = None

    def before_step(self, step: int) -> None:
        """`step`: the step about to run."""
        if not self.first <= step <= self.last:
            return
        if self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        self._range = torch.profiler.record_function(f"train_step {step}")
        self._range.__enter__()

    def after_step(self, step: int) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self._prof is not None and step >= self.last:
            self._prof.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(str(self.path))
            self._prof = None


class TraceRecorder:
    """Rank 0 appends each step's global rows per expert per bank to the routing trace."""

    def __init__(self, run_dir: Path, model: Any, world_size: int, tokens_per_step: int) -> None:
        self.path = run_dir / "routing_trace.jsonl"
        self.model, self.world, self.tokens = model, world_size, tokens_per_step
        self.expert_bytes: dict[str, int] = {}
        self._writer: TraceWriter | None = None

    def record(self, step: int, load: dict[str, Tensor]) -> None:
        banks = {b: [int(v) for v in c.tolist()] for b, c in load.items()}
        if self._writer is None:
            resumed = step > 1 and self.path.exists()
            if resumed:  # lines past the checkpoint describe a rolled-back trajectory
                _keep_steps_before(self.path, step)
            self._writer = TraceWriter(self.path, self._header(banks), append=resumed)
        self._writer.write(step, banks)

    def _header(self, banks: dict[str, list[int]]) -> dict[str, Any]:
        cfg = getattr(self.model, "cfg", None)
        family = getattr(cfg, "family", None) or type(self.model).__name__.lower()
        return {
            "model": family,
            "world_size": self.world,
            "tokens_per_step": self.tokens,
            "top_k": getattr(cfg, "top_k", None),
            "banks": {
                b: {
                    "num_experts": len(c),
                    "expert_bytes": self.expert_bytes.get(b, 0),
                    "rows_per_token": sum(c) / max(1, self.tokens),
                }
                for b, c in banks.items()
            },
        }


def _keep_steps_before(path: Path, step: int) -> None:
    lines = path.read_text().splitlines()
    if not lines:
        return
    kept = [ln for ln in lines[1:] if ln.strip() and json.loads(ln)["step"] < step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in [lines[0], *kept]))
    tmp.replace(path)
