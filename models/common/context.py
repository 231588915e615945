"""Per-forward context: global-batch statistics, auxiliary losses and expert load.

Models know nothing of parallelism, yet their auxiliary losses must use global-batch statistics
(DESIGN.md §4, world-size invariance). The trainer hands each forward a `MoEContext` whose
`reducer` sums small tensors over the data-parallel ranks; models call it and stay ignorant of
process groups. The context also collects the auxiliary losses and the tokens-per-expert of every
bank for this step, so nothing lives in module-level globals.

[Note: gradient convention]
Every loss a model reports is the *global* loss (the same value on every rank). Strategies average
gradients over ranks (DDP, FSDP2 and the FSSDP reduce all divide by W), so each rank's backward
must produce W times its own share of the global gradient. `global_sum` builds exactly that: its
value is the sum over ranks, its gradient with respect to the local input is W.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class BatchReducer:
    """Sums tensors over the data-parallel ranks (no autograd). Identity at world size 1."""

    world_size: int = 1
    all_sum: Callable[[Tensor], Tensor] = lambda t: t


def global_sum(local: Tensor, reducer: BatchReducer) -> Tensor:
    """Σ over ranks of `local`; gradient w.r.t. `local` is W (see [Note: gradient convention])."""
    total = reducer.all_sum(local.detach().clone())
    if not local.requires_grad:
        return total
    return total + reducer.world_size * (local - local.detach())


class AuxPool(Protocol):
    """Statistics of several calls that make one loss once the forward is done."""

    def loss(self, reducer: BatchReducer) -> Tensor: ...


class MoEContext:
    """What one forward pass reports besides its output.

    Deliberately not a dataclass: FSDP2 looks for gradient-carrying tensors inside dataclass
    arguments of wrapped modules and hooks them, which would tie each layer's post-backward to
    the aux losses of the layers before it (seen as a cross-rank deadlock; see
    [Note: three process groups] in fssdp/executor.py).
    """

    def __init__(self, reducer: BatchReducer | None = None) -> None:
        self.reducer = reducer if reducer is not None else BatchReducer()
        # name -> already-weighted global auxiliary loss (summed over the calls that add to it)
        self.aux_losses: dict[str, Tensor] = {}
        # bank name -> global tokens per expert [E] (int64, summed over the calls of that bank)
        self.expert_load: dict[str, Tensor] = {}
        # name -> (coefficient, statistics pooled over calls), turned into a loss by `finish`
        self.pools: dict[str, tuple[float, AuxPool]] = {}

    def pool(self, name: str, coef: float, new: Callable[[], AuxPool]) -> AuxPool:
        """The pool of loss `name` for this forward (created by `new()` at the first call)."""
        if name not in self.pools:
            self.pools[name] = (coef, new())
        return self.pools[name][1]

    def finish(self) -> None:
        """Turn the pooled statistics into their weighted losses; models call it at the end of
        their forward (the same point on every rank, so its all-reduces line up)."""
        for name, (coef, pool) in self.pools.items():
            self.add_aux(name, coef * pool.loss(self.reducer))
        self.pools.clear()

    def add_aux(self, name: str, value: Tensor) -> None:
        prev = self.aux_losses.get(name)
        self.aux_losses[name] = value if prev is None else prev + value

    def add_load(self, bank_name: str, counts_E: Tensor) -> None:
        counts_E = counts_E.detach().to(torch.int64)
        prev = self.expert_load.get(bank_name)
        self.expert_load[bank_name] = counts_E if prev is None else prev + counts_E

    def aux_total(self) -> Tensor | None:
        self.finish()
        if not self.aux_losses:
            return None
        return sum(self.aux_losses.values())  # type: ignore[return-value]
