"""Per-forward context: global-batch statistics, auxiliary losses and expert load.

Models know nothing of parallelism, yet their auxiliary losses must use global-batch statistics
(world-size invariance: [Note: gradient convention] below). The trainer hands each forward a
`MoEContext` whose `reducer` sums small tensors over the data-parallel ranks; models call it and
stay ignorant of process groups. The context also collects the auxiliary losses and the
tokens-per-expert of every bank for this step, so nothing lives in module-level globals.

[Note: gradient convention]
Every loss a model reports is the *global* loss (the same value on every rank). Strategies average
gradients over ranks (DDP, FSDP2 and the FSSDP reduce all divide by W), so each rank's backward
must produce W times its own share of the global gradient. `global_sum` builds exactly that: its
value is the sum over ranks, its gradient with respect to the local input is W.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


# [Note: accumulation statistics]
# A step of M micro-batches must report the losses of the full global batch (world-size
# invariant, as without accumulation).
# Every model loss is built from `all_sum` totals (`global_sum`, `global_mean`): the value is
# the global total, the gradient W × the local term ([Note: gradient convention]). So if
# `all_sum` returns the *full-step* totals (over ranks and micro-batches), every micro-batch's
# loss has the full-batch value, and its backward yields exactly its share of the full-batch
# gradient (autograd linearises the loss around the global statistic); the micro-batches'
# gradients sum to the full-batch gradient, for any nonlinear loss of those totals.
# `StepStatistics` gets the totals by a no-grad pre-pass over the step's micro-batches: each
# `all_sum` call (by call index) adds its local input to slot i (`recorder`); `reduce()` then
# all-reduces the slots once, one flat buffer per dtype; the micro-batch forwards replay slot i
# at call i (`replayer`, no communication). This needs the sequence of calls (count, shapes,
# dtypes) to be the same in every micro-batch, and no `all_sum` input to depend on an earlier
# `all_sum` output of the same forward (true of every loss in the zoo: the totals feed losses,
# never the statistics of later calls); a different sequence fails with a clear error.


class StepStatistics:
    """Full-step `all_sum` totals: recorded by a pre-pass, reduced once, replayed
    ([Note: accumulation statistics])."""

    def __init__(self, base: BatchReducer) -> None:
        self.base = base
        self.sums: list[Tensor] = []
        self.totals: list[Tensor] | None = None
        self._first = True  # recording the first micro-batch (creates the slots)
        self._calls = 0

    def recorder(self) -> BatchReducer:
        """The reducer of one micro-batch of the pre-pass (returns the local value)."""
        if self._calls and self._calls != len(self.sums):
            raise RuntimeError(self._mismatch(f"{self._calls} calls", f"{len(self.sums)}"))
        self._first, self._calls = not self.sums, 0

        def all_sum(t: Tensor) -> Tensor:
            i, self._calls = self._calls, self._calls + 1
            if self._first:
                self.sums.append(t.detach().clone())
            else:
                self._check(i, t)
                self.sums[i] += t.detach()
            return t

        return BatchReducer(self.base.world_size, all_sum)

    def reduce(self) -> None:
        """All-reduce every slot: one flat all_sum per dtype (and device)."""
        if self._calls != len(self.sums):
            raise RuntimeError(self._mismatch(f"{self._calls} calls", f"{len(self.sums)}"))
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(self.sums):
            groups.setdefault((t.dtype, t.device), []).append(i)
        totals: list[Tensor] = list(self.sums)
        for idx in groups.values():
            flat = torch.cat([self.sums[i].reshape(-1) for i in idx])
            flat = self.base.all_sum(flat)
            for i, part in zip(idx, flat.split([self.sums[i].numel() for i in idx])):
                totals[i] = part.view_as(self.sums[i])
        self.totals = totals

    def replayer(self) -> BatchReducer:
        """The reducer of one micro-batch's training forward: call i returns total i."""
        assert self.totals is not None, "reduce() first"
        totals, pos = self.totals, [0]

        def all_sum(t: Tensor) -> Tensor:
            i = pos[0]
            pos[0] += 1
            if i >= len(totals):
                raise RuntimeError(self._mismatch(f"more than {len(totals)} calls", "fewer"))
            self._check(i, t)
            return totals[i].clone()

        return BatchReducer(self.base.world_size, all_sum)

    def _check(self, i: int, t: Tensor) -> None:
        ref = self.sums[i] if i < len(self.sums) else None
        if ref is None or ref.shape != t.shape or ref.dtype != t.dtype:
            got = f"call {i}: {tuple(t.shape)} {t.dtype}"
            want = "nothing" if ref is None else f"{tuple(ref.shape)} {ref.dtype}"
            raise RuntimeError(self._mismatch(got, want))

    @staticmethod
    def _mismatch(got: str, want: str) -> str:
        return (
            f"global-batch statistics differ between micro-batches ({got}, expected {want}): "
            "the model's all_sum calls must be the same in every forward; use "
            "train.batch_stats=micro_batch for such a model"
        )


class StatTape:
    """The `all_sum` results of one region of a forward, in call order: recorded by the first
    run of the region, replayed (no communication) when activation checkpointing recomputes it
    ([Note: recomputation reuse] in fssdp/recompute.py)."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.pos = 0

    def recording(self, base: BatchReducer) -> BatchReducer:
        def all_sum(t: Tensor) -> Tensor:
            out = base.all_sum(t)
            self.values.append(out.detach().clone())
            return out

        return BatchReducer(base.world_size, all_sum)

    def replaying(self, base: BatchReducer) -> BatchReducer:
        self.pos = 0

        def all_sum(t: Tensor) -> Tensor:
            if self.pos >= len(self.values):
                raise RuntimeError("recomputation made more all_sum calls than the forward")
            out = self.values[self.pos]
            self.pos += 1
            if out.shape != t.shape:
                raise RuntimeError("recomputation's all_sum calls differ from the forward's")
            return out.clone()

        return BatchReducer(base.world_size, all_sum)


class _Discard:
    """A pool that keeps nothing (the pools of a recomputed region)."""

    def add(self, *args: object, **kwargs: object) -> None:
        return None

    def loss(self, reducer: BatchReducer) -> Tensor:
        raise AssertionError("a discarded pool has no loss")


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
        # Recomputing a checkpointed region: what it reports was reported by its first run.
        self.replaying = False

    @contextmanager
    def recorded(self, tape: StatTape) -> Iterator[None]:
        """A region run for the first time: its all_sum results go to `tape`."""
        base = self.reducer
        self.reducer = tape.recording(base)
        try:
            yield
        finally:
            self.reducer = base

    @contextmanager
    def replayed(self, tape: StatTape) -> Iterator[None]:
        """A region recomputed: all_sum replays `tape`, and nothing is reported again (aux
        losses, expert load and pools were added by its first run)."""
        base, was = self.reducer, self.replaying
        self.reducer, self.replaying = tape.replaying(base), True
        try:
            yield
        finally:
            self.reducer, self.replaying = base, was

    def pool(self, name: str, coef: float, new: Callable[[], AuxPool]) -> AuxPool:
        """The pool of loss `name` for this forward (created by `new()` at the first call)."""
        if self.replaying:
            return _Discard()  # type: ignore[return-value]
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
        if self.replaying:
            return
        prev = self.aux_losses.get(name)
        self.aux_losses[name] = value if prev is None else prev + value

    def add_load(self, bank_name: str, counts_E: Tensor) -> None:
        if self.replaying:
            return
        counts_E = counts_E.detach().to(torch.int64)
        prev = self.expert_load.get(bank_name)
        self.expert_load[bank_name] = counts_E if prev is None else prev + counts_E

    def aux_total(self) -> Tensor | None:
        self.finish()
        if not self.aux_losses:
            return None
        return sum(self.aux_losses.values())  # type: ignore[return-value]
