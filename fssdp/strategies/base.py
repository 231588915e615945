"""What every strategy hands the trainer: a model ready to train, and its accounting."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Parallelized:
    """A model prepared for one strategy. Subclasses override the parts they change.

    The trainer calls `module(...)` for the forward, `finish_backward()` after backward,
    `clip_grad_norm_()`, then steps the optimizer built over `optimizer_params()`.
    """

    name = "none"

    def __init__(self, model: nn.Module, module: nn.Module | None = None) -> None:
        # The unwrapped model: its FQNs name parameters in checkpoints and metrics.
        self.model = model
        # What the forward calls (a DDP/FSDP wrapper, or the model itself).
        self.module = module if module is not None else model

    def optimizer_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def finish_backward(self) -> None:
        """Complete gradient synchronisation that backward left in flight."""

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.optimizer_params(), max_norm)

    def comm_bytes(self) -> dict[str, int]:
        """Bytes sent this step, summed over ranks, by collective."""
        return {"spag": 0, "sprs": 0, "a2a": 0, "dense": 0}

    def expert_time_s(self) -> float | None:
        """Seconds this rank spent in expert compute this step (None: not measured)."""
        return None
