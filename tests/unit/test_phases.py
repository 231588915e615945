"""Phase timing in one process: exclusive accounting, dropped spans, the CUDA clock, backward
attribution through autograd, router timing, world 1 (fssdp/phases.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fssdp.phases import PhaseTimer, time_backward_chain, time_routers
from models.common.router import Router
from tests.support.parity import train_capture
from tests.support.phase_checks import check_spans, timed_record


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_exclusive_accounting_and_dropped_spans() -> None:
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    assert timer.begin("forward") is None and timer.end_step() is None  # inert until started
    timer.start_step()  # t = 0
    clock.t = 1.0
    with timer.phase("forward"):
        clock.t = 2.0
        tok = timer.begin("expert")
        clock.t = 5.0
        timer.end(tok)
        clock.t = 7.0
    clock.t = 8.0
    back = timer.begin("backward")
    clock.t = 9.0
    timer.begin("combine")  # a hook that never gets its end: dropped, the parent keeps the time
    clock.t = 12.0
    timer.end(back)
    clock.t = 13.0
    got = timer.end_step()
    assert got is not None and not timer.active
    assert got.times == {"forward": 3.0, "expert": 3.0, "backward": 4.0, "other": 3.0}
    assert got.total_s == 13.0
    assert got.spans == [
        ("forward", 1.0, 7.0, 0),
        ("expert", 2.0, 5.0, 1),
        ("backward", 8.0, 12.0, 0),
    ]
    assert sum(got.times.values()) == got.total_s


def test_cuda_clock_uses_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch (no GPU here): events recorded in order, resolved after one sync."""
    clock = FakeClock()
    synced: list[bool] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t: float | None = None

        def record(self) -> None:
            self.t = clock.t

        def elapsed_time(self, other: FakeEvent) -> float:
            assert synced and self.t is not None and other.t is not None
            return (other.t - self.t) * 1e3  # milliseconds, like CUDA

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(True))
    timer = PhaseTimer(torch.device("cuda", 0))
    clock.t = 10.0
    timer.start_step()
    clock.t = 11.0
    with timer.phase("expert"):
        clock.t = 13.5
    clock.t = 14.0
    got = timer.end_step()
    assert got is not None and synced == [True]
    assert got.spans == [("expert", 1.0, 3.5, 0)]
    assert got.times == {"expert": 2.5, "other": 1.5}


def test_backward_chain_follows_autograd() -> None:
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    w = torch.ones(3, requires_grad=True)

    def tick(t: torch.Tensor, at: float) -> torch.Tensor:
        class _At(torch.autograd.Function):  # moves the clock when backward passes here
            @staticmethod
            def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
                return x.view_as(x)

            @staticmethod
            def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
                clock.t = at
                return g

        return _At.apply(t)

    timer.start_step()
    a = w * 2
    b = tick(a * 3, 4.0)  # backward passes here after the expert hook began
    c = tick(b * 1.0, 2.0)  # backward passes here first
    time_backward_chain(timer, [c, b, a], ["combine", "expert"])
    clock.t = 1.0
    with timer.phase("backward"):
        c.sum().backward()
        clock.t = 6.0
    got = timer.end_step()
    assert got is not None
    names = [(s[0], s[1], s[2], s[3]) for s in got.spans]
    assert names == [("backward", 1.0, 6.0, 0), ("combine", 1.0, 2.0, 1), ("expert", 2.0, 4.0, 1)]
    assert w.grad is not None and torch.equal(w.grad, torch.full((3,), 6.0))


class ToyRouter(Router):  # routers are found by their base class
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(-1)


def test_routers_timed_once_per_call_whether_called_or_logits() -> None:
    model = nn.Sequential(ToyRouter(), nn.Linear(3, 3))
    timer = PhaseTimer()
    handles = time_routers(model, timer)
    assert len(handles) == 2
    assert time_routers(model, timer) == []  # not instrumented twice
    x = torch.randn(5, 4)
    ref = model(x)
    timer.start_step()
    out = model(x)  # forward → logits inside: one span
    model[0].logits(x)  # logits alone: one span
    got = timer.end_step()
    assert got is not None
    assert [s[0] for s in got.spans] == ["router", "router"]
    assert torch.equal(out, ref)


def test_world_one_has_no_wait_and_no_sparse_phases() -> None:
    rec = train_capture(0, 1, ["parallel=none"], 1, probe=timed_record)["probe"]
    assert "wait" not in rec["phase_time_s"] and "dispatch" not in rec["phase_time_s"]
    assert len(rec["phase_spans"]) == 1
    check_spans(rec["phase_spans"][0], "none")
