"""`parallel=` configuration: which strategy runs the model, and its knobs."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("none", "ddp", "fsdp", "ep", "fssdp")


@dataclass
class ParallelConfig:
    strategy: str = "ddp"  # none | ddp | fsdp | ep | fssdp
    # Seconds a collective may wait before the run fails naming rank and phase.
    timeout_s: float = 300.0
