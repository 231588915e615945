"""Per-rank phase timing of one training step: where the step's time goes, rank by rank.

Phases (`PHASES`): `data` (next batch), `forward` (dense forward: attention, norms, embeddings,
loss), `router`, `spag` (SparseAllGather: issue and exposed wait, rematerialisation refills),
`dispatch` (count all-gather, token assignment, token all-to-all out), `expert` (grouped expert
compute), `combine` (token all-to-all back), `backward` (dense backward), `sprs`
(SparseReduceScatter: issue and wait), `wait` (barrier before the optimizer: time this rank waits
for the slowest), `optimizer` (clipping, step, zeroing), `plan` (FSSDP's placement planning after
the step), and `other` (what no span covers). A strategy without a phase reports none of it.

[Note: exclusive time]
Spans nest: a span begun while another is open is its child. A phase's time is *exclusive*: its
spans' durations minus their children's. So `forward` is the dense forward (what the router,
spAG, dispatch, expert and combine spans inside it leave), the phases of a step add up to the
step, and nothing is counted twice.

[Note: backward attribution]
Backward runs inside autograd. The executors register tensor hooks (only on timed steps; a hook
that returns None changes no gradient) around each bank call: the gradient of the combine's
output arriving begins `combine`, that of the expert output ends it and begins `expert`, that of
the received rows ends `expert` and begins `dispatch`, that of the rows sent ends it. These spans
nest inside `backward`, so `expert` and the all-to-alls cover forward and backward both. The
autograd engine runs a bank's chain back to back (its nodes are the newest ready ones), so the
spans are close to exact; a node of another branch run in between would be counted in the span.
DDP's all-reduce and FSDP2's collectives stay inside `forward` / `backward`.

[Note: clocks]
CPU: `time.perf_counter`. CUDA: events on the current stream, resolved once at the end of the
step (one synchronisation, so the trainer times only the steps it logs). Spans that a hook began
but no hook ended (a path autograd skipped) are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.common.router import Router

PHASES = (
    "data",
    "forward",
    "router",
    "spag",
    "dispatch",
    "expert",
    "combine",
    "backward",
    "sprs",
    "wait",
    "optimizer",
    "plan",
    "other",
)

Span = tuple[str, float, float, int]  # (phase, start s, end s, depth), relative to the step start


@dataclass
class StepPhases:
    """One rank's phases of one step."""

    total_s: float  # step start → end_step
    times: dict[str, float] = field(default_factory=dict)  # exclusive seconds per phase
    spans: list[Span] = field(default_factory=list)


class _Open:
    __slots__ = ("name", "start", "end", "parent", "depth")

    def __init__(self, name: str, start: Any, parent: int, depth: int) -> None:
        self.name, self.start, self.end, self.parent, self.depth = name, start, None, parent, depth


class _NullPhase:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _NullPhase()


class _Phase:
    __slots__ = ("timer", "name", "token")

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name, self.token = timer, name, None

    def __enter__(self) -> None:
        self.token = self.timer.begin(self.name)

    def __exit__(self, *exc: object) -> None:
        self.timer.end(self.token)


class PhaseTimer:
    """Collects nested phase spans between `start_step()` and `end_step()`; inert otherwise.

    `with timer.phase("spag"): ...`, or `tok = timer.begin("expert")` … `timer.end(tok)` where
    the end happens elsewhere (autograd hooks). Outside a timed step both cost one attribute read.
    """

    def __init__(
        self, device: torch.device | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self.active = False
        self._cuda = device is not None and device.type == "cuda" and clock is None
        self._clock = clock or time.perf_counter
        self._spans: list[_Open] = []
        self._open: list[int] = []  # indices into _spans, innermost last
        self._t0: Any = None

    def _mark(self) -> Any:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return self._clock()

    def start_step(self) -> None:
        self._spans, self._open = [], []
        self._t0 = self._mark()
        self.active = True

    def begin(self, name: str) -> int | None:
        if not self.active:
            return None
        parent = self._open[-1] if self._open else -1
        depth = self._spans[parent].depth + 1 if parent >= 0 else 0
        self._spans.append(_Open(name, self._mark(), parent, depth))
        self._open.append(len(self._spans) - 1)
        return len(self._spans) - 1

    def end(self, token: int | None) -> None:
        if token is None or not self.active or token >= len(self._spans):
            return
        span = self._spans[token]
        if span.end is not None:
            return
        span.end = self._mark()
        if token in self._open:
            self._open.remove(token)

    def phase(self, name: str) -> _Phase | _NullPhase:
        return _Phase(self, name) if self.active else _NULL

    def end_step(self) -> StepPhases | None:
        """Stop timing; the step's exclusive phase times and spans (None if not timing)."""
        if not self.active:
            return None
        t_end = self._mark()
        self.active = False
        to_s = self._resolver(t_end)
        total = to_s(t_end)
        kept = [s for s in self._spans if s.end is not None]
        starts = {id(s): to_s(s.start) for s in kept}
        ends = {id(s): to_s(s.end) for s in kept}
        times: dict[str, float] = {}
        covered = 0.0
        for s in self._spans:
            if s.end is None:
                continue
            dur = max(0.0, ends[id(s)] - starts[id(s)])
            times[s.name] = times.get(s.name, 0.0) + dur
            parent = s.parent
            while parent >= 0 and self._spans[parent].end is None:
                parent = self._spans[parent].parent  # a dropped parent: the grandparent pays
            if parent >= 0:
                pname = self._spans[parent].name
                times[pname] = times.get(pname, 0.0) - dur
            else:
                covered += dur
        times = {k: max(0.0, v) for k, v in times.items()}
        times["other"] = max(0.0, total - covered)
        spans = [(s.name, starts[id(s)], ends[id(s)], s.depth) for s in kept]
        self._spans, self._open = [], []
        return StepPhases(total, times, spans)

    def _resolver(self, t_end: Any) -> Callable[[Any], float]:
        t0 = self._t0
        if self._cuda:
            torch.cuda.synchronize()  # every recorded event, whichever stream recorded it
            return lambda ev: t0.elapsed_time(ev) / 1e3
        return lambda t: t - t0


# Set on executors until a strategy hands them the trainer's timer: never active.
NULL_TIMER = PhaseTimer()


def time_backward_chain(timer: PhaseTimer, tensors: list[Tensor], names: list[str]) -> None:
    """Time a chain of backward phases with gradient hooks ([Note: backward attribution]).

    `tensors` run from the output back to the input of a forward chain; `names[i]` is the phase
    between `tensors[i]` and `tensors[i + 1]` in backward: it begins when the gradient of
    `tensors[i]` is ready and ends when that of `tensors[i + 1]` is. Tensors without gradient are
    skipped (with the phase that would begin there). No-op unless a step is being timed.
    """
    if not timer.active or not torch.is_grad_enabled():
        return
    tokens: list[int | None] = [None] * len(names)

    def at(i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if i > 0:
                timer.end(tokens[i - 1])
            if i < len(names):
                tokens[i] = timer.begin(names[i])

        return hook

    for i, t in enumerate(tensors):
        if t.requires_grad:
            t.register_hook(at(i))


def time_routers(model: nn.Module, timer: PhaseTimer) -> list[Any]:
    """Time every router of `model` as phase `router`, without touching the model's code.

    A router is an instance of `models.common.router.Router` (TopKRouter and the families' own).
    Some families call `router.logits(x)` rather than `router(x)`, so both `forward` (module
    hooks) and `logits` (an instance attribute wrapping the bound method) are timed; a call of one
    inside the other is counted once. Returns removable handles.
    """
    handles: list[Any] = []
    for mod in model.modules():
        if not isinstance(mod, Router) or getattr(mod, "_fssdp_timed", False):
            continue
        state = {"token": None, "depth": 0}
        handles.append(mod.register_forward_pre_hook(_enter_router(timer, state)))
        handles.append(mod.register_forward_hook(_exit_router(timer, state)))
        if callable(getattr(mod, "logits", None)):
            mod.logits = _timed_logits(mod.logits, timer, state)  # type: ignore[method-assign]
        mod._fssdp_timed = True
    return handles


def _enter_router(timer: PhaseTimer, state: dict[str, Any]) -> Callable[..., None]:
    def hook(mod: nn.Module, args: Any) -> None:
        if state["depth"] == 0:
            state["token"] = timer.begin("router")
        state["depth"] += 1

    return hook


def _exit_router(timer: PhaseTimer, state: dict[str, Any]) -> Callable[..., None]:
    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        state["depth"] = max(0, state["depth"] - 1)
        if state["depth"] == 0:
            timer.end(state["token"])

    return hook


def _timed_logits(
    fn: Callable[..., Any], timer: PhaseTimer, state: dict[str, Any]
) -> Callable[..., Any]:
    enter, leave = _enter_router(timer, state), _exit_router(timer, state)

    def logits(*args: Any, **kwargs: Any) -> Any:
        enter(None, args)  # type: ignore[arg-type]
        try:
            return fn(*args, **kwargs)
        finally:
            leave(None, args, None)  # type: ignore[arg-type]

    return logits
