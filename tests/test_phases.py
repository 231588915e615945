"""Phase timing: exclusive accounting, router timing, every strategy's phases on real steps, and
no change to numerics (fssdp/phases.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fssdp.phases import PhaseTimer, time_backward_chain, time_routers
from tests.harness import run_distributed
from tests.parity import train_capture

BANK_CALLS = 4  # gpt_moe_tiny: one bank and one router per layer, 4 layers


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


class ToyRouter(nn.Module):
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


# -- real steps, every strategy --------------------------------------------------------------
def _timed_record(trainer: Any) -> dict[str, Any]:
    trainer.cfg.log_every = 1  # the next step is logged, so timed
    out = trainer.train_step()
    return trainer._record(out)


STRATEGIES = {
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "ep": ["parallel=ep", "model.route_skew=1.0"],
    "fssdp": ["parallel=fssdp", "model.route_skew=1.0", "parallel.rematerialize=true"],
}


def _every_strategy(rank: int, world: int) -> dict[str, Any]:
    out = {
        name: train_capture(rank, world, ov, 2, probe=_timed_record)["probe"]
        for name, ov in STRATEGIES.items()
    }
    # Timing on for every step versus off: the same losses and gradients, bit for bit. The
    # overlap degree is fixed: measured (-1), it makes the placement, and with it the order of
    # floating-point sums, depend on the machine's timing from run to run.
    skew = [
        "parallel=fssdp",
        "model.route_skew=1.0",
        "parallel.rematerialize=true",
        "parallel.overlap_degree=2",
    ]
    out["timed"] = train_capture(rank, world, [*skew, "train.log_every=1"], 3)
    out["untimed"] = train_capture(rank, world, [*skew, "train.phase_timing=false"], 3)
    return out


def _inside(span: list[Any], outer: list[Any]) -> bool:
    return outer[1] <= span[1] and span[2] <= outer[2] + 1e-9 and span[3] > outer[3]


def _check_spans(rank_spans: list[list[Any]], label: str) -> None:
    top = {s[0]: s for s in rank_spans if s[3] == 0}
    assert {"forward", "backward", "optimizer"} <= set(top), (label, sorted(top))
    for s in rank_spans:
        assert 0.0 <= s[1] <= s[2], (label, s)
    fwd, bwd = top["forward"], top["backward"]
    experts = [s for s in rank_spans if s[0] == "expert"]
    assert sum(_inside(s, fwd) for s in experts) == BANK_CALLS, (label, experts)
    assert sum(_inside(s, bwd) for s in experts) == BANK_CALLS, (label, experts)
    routers = [s for s in rank_spans if s[0] == "router"]
    assert len(routers) == BANK_CALLS and all(_inside(s, fwd) for s in routers), label


def _check_record(name: str, rec: dict[str, Any]) -> None:
    times = rec["phase_time_s"]
    sparse = {"spag", "dispatch", "combine", "sprs", "plan"}
    expect = {"data", "forward", "router", "expert", "backward", "wait", "optimizer", "other"}
    if name in ("ep", "fssdp"):
        expect |= sparse
    else:
        assert not sparse & set(times), (name, sorted(times))
    assert expect <= set(times), (name, sorted(times))
    assert all(len(v) == 2 and min(v) >= 0 for v in times.values()), name
    assert all(times[p][r] > 0 for p in ("forward", "backward", "expert") for r in range(2)), name
    for r in range(2):
        total = sum(v[r] for v in times.values())
        step = rec["rank_step_time_s"][r]
        assert abs(total - step) <= 0.25 * step, (name, r, total, step)  # accounts for the step
        _check_spans(rec["phase_spans"][r], f"{name} rank {r}")


def test_every_strategy_reports_its_phases_and_numerics_do_not_move() -> None:
    res = run_distributed(_every_strategy, 2, timeout_s=300)
    for rank in range(2):
        for name in STRATEGIES:
            _check_record(name, res[rank][name])
    timed, untimed = res[0]["timed"], res[0]["untimed"]
    assert timed["loss"] == untimed["loss"] and timed["aux"] == untimed["aux"]
    for gt, gu in zip(timed["grads"], untimed["grads"]):
        assert gt.keys() == gu.keys()
        assert all(torch.equal(gt[k], gu[k]) for k in gt), "timing changed a gradient"


def test_world_one_has_no_wait_and_no_sparse_phases() -> None:
    rec = train_capture(0, 1, ["parallel=none"], 1, probe=_timed_record)["probe"]
    assert "wait" not in rec["phase_time_s"] and "dispatch" not in rec["phase_time_s"]
    assert len(rec["phase_spans"]) == 1
    _check_spans(rec["phase_spans"][0], "none")
