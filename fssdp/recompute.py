"""Activation checkpointing per block (`train.activation_checkpointing=full|selective`).

Each checkpointed unit (the model spec's FSDP units; a model without any, SUT, gets its direct
children that hold an expert bank) runs its forward under `torch.utils.checkpoint`
(non-reentrant, early stop off): its activations are dropped after forward and recomputed in
backward. The unit's `forward` is replaced on the instance, so parameter names (checkpoints,
metrics) do not change and FSDP2's hooks stay around it.

[Note: recomputation reuse]
A recomputed unit re-runs Python: its routers, its `all_sum` statistics and its expert banks.
What the first run already did must not happen twice, and nothing may issue a collective in
backward that could cross another rank's different collective:
- global-batch statistics: the first run records every `all_sum` result on the region's
  `StatTape` (`MoEContext.recorded`), the recomputation replays them (`MoEContext.replayed`):
  no all-reduce in backward. The replaying context also drops what the region reports (aux
  losses, expert load, pools): the first run reported them; the loss was built from those.
- expert banks, `full`: the recomputation calls the bank again, so its token all-to-alls run
  again (dispatch group, at the same point of every rank's backward: the unit's first node
  with saved tensors). The count all-gather is not repeated: the first run's [W, E] counts are
  replayed (`Region.counts`), the step's placement and held replicas are reused (no planning,
  no spAG; under `parallel.rematerialize` the replicas freed after forward are refilled once,
  here, and the backward hook finds them held), and the step's counters are not added to.
- expert banks, `selective`: the bank calls are not recomputed. Their activations are saved
  as without checkpointing (the bank runs under identity saved-tensor hooks, outside the
  checkpoint's frame) and the recomputation gets the first run's output back. So backward
  recomputes norms, attention, routers and gating only: no second all-to-all, no second
  expert compute. Chosen because those are what recomputation buys cheaply (attention's
  [B, H, S, S] scores, norms, the router's [T, E] scores), while recomputing a bank costs two
  all-to-alls and its GEMMs and keeps, for its backward, rows that must be gathered anyway.
Each region is one run of a unit: a unit called several times a step (MoEUT, SUT) gets a
region per call, each replaying its own records.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from models.common.context import MoEContext, StatTape
from models.common.experts import ExpertBank

MODES = ("none", "full", "selective")
_LOCAL = threading.local()  # the region running on this thread (recompute runs in backward)


class Region:
    """One run of a checkpointed unit: what its first run recorded for its recomputation."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.stats = StatTape()
        self.replaying = False
        self._records: list[Any] = []  # per bank call: counts (full) or the output (selective)
        self._pos = 0

    def record(self, value: Any) -> None:
        self._records.append(value)

    def replay(self) -> Any:
        if self._pos >= len(self._records):
            raise RuntimeError("recomputation called an expert bank the forward did not call")
        value = self._records[self._pos]
        self._pos += 1
        return value

    def begin(self, replaying: bool) -> None:
        self.replaying, self._pos = replaying, 0


def current() -> Region | None:
    """The checkpointed region running now on this thread (None outside one)."""
    return getattr(_LOCAL, "region", None)


@contextmanager
def _active(region: Region) -> Iterator[None]:
    prev = current()
    _LOCAL.region = region
    try:
        yield
    finally:
        _LOCAL.region = prev


def _keep(t: Tensor) -> Tensor:
    return t


class BankRecompute:
    """`bank.executor` inside a checkpointed unit: wraps the strategy's executor. Outside a
    region (evaluation, the statistics pre-pass) it is the executor itself."""

    def __init__(self, inner: Callable[[ExpertBank, Tensor, Tensor], Tensor]) -> None:
        self.inner = inner

    def __call__(self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        region = current()
        if region is None or region.mode != "selective":
            return self.inner(bank, x_ND, expert_N)  # full: the executor replays its counts
        if region.replaying:
            y, grad = region.replay()
            return y.detach().requires_grad_(grad)
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            y = self.inner(bank, x_ND, expert_N)
        region.record((y.detach(), y.requires_grad))
        return y

    def __getattr__(self, name: str) -> Any:  # the strategy's executor's attributes
        return getattr(self.inner, name)


def recompute_counts(compute: Callable[[], Tensor]) -> Tensor:
    """An executor's [W, E] count matrix: all-gathered by `compute()` outside a recomputation
    (recorded when inside a region's first run), replayed inside one."""
    region = current()
    if region is None or region.mode != "full":
        return compute()
    if region.replaying:
        return region.replay()
    counts_WE = compute()
    region.record(counts_WE)
    return counts_WE


def replaying() -> bool:
    """Whether a bank called now is being recomputed (`full` mode, [Note: recomputation
    reuse]): reuse the step's placement and replicas, count nothing."""
    region = current()
    return region is not None and region.mode == "full" and region.replaying


def _find_ctx(args: tuple[Any, ...], kwargs: dict[str, Any]) -> MoEContext | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, MoEContext):
            return a
    return None


def _checkpointed(orig: Callable[..., Any], mode: str) -> Callable[..., Any]:
    @functools.wraps(orig)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation, the statistics pre-pass
            return orig(*args, **kwargs)
        region = Region(mode)
        ctx = _find_ctx(args, kwargs)
        runs = [0]

        def run(*a: Any, **k: Any) -> Any:
            again = runs[0] > 0
            runs[0] += 1
            region.begin(replaying=again)
            if ctx is None:
                scope: Any = nullcontext()
            else:
                scope = ctx.replayed(region.stats) if again else ctx.recorded(region.stats)
            with _active(region), scope:
                return orig(*a, **k)

        with set_checkpoint_early_stop(False):  # every rank recomputes the whole unit
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def checkpoint_units(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """The modules checkpointed one by one: the FSDP units, else (a model without any) the
    model's direct children that hold an expert bank."""
    if units:
        return units
    return [m for m in model.children() if any(isinstance(x, ExpertBank) for x in m.modules())]


def apply_checkpointing(model: nn.Module, units: list[nn.Module], mode: str) -> list[nn.Module]:
    """Checkpoint every unit's forward (`full` | `selective`, [Note: recomputation reuse]);
    returns the units checkpointed. Call after the strategy attached its bank executors."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: use one of {MODES}")
    if mode == "none":
        return []
    chosen = checkpoint_units(model, units)
    for unit in chosen:
        unit.forward = _checkpointed(unit.forward, mode)  # type: ignore[method-assign]
        for bank in unit.modules():
            if isinstance(bank, ExpertBank) and not isinstance(bank.executor, BankRecompute):
                inner = bank.executor or (lambda b, x, e: b.compute(b.stacked(), x, e))
                bank.executor = BankRecompute(inner)
    return chosen
