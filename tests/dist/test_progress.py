"""[Note: rounds in the background] (collectives/progress.py) on 4 gloo ranks: an async tree
spAG relays its copies through all its rounds while the callers never wait, and its spRS folds
back the same way; `wait()` then only returns what has already arrived. A collective that
fails raises in the caller's `wait()`, naming the rank and phase. The simulator's hand-off
probe (`round_trip_s`) times jobs that really go through a worker thread."""

from __future__ import annotations

import time

import pytest
import torch

from tests.support.harness import run_distributed

S = 3  # elements per expert
OWNER = [0, 1]
EVERYWHERE = {0: [1, 2, 3], 1: [0, 2, 3]}  # 3 new holders each: a binomial tree of 2 rounds


def _row(e: int) -> torch.Tensor:
    return torch.full((S,), float(e + 1), dtype=torch.float64)


def _until(done: object, limit_s: float = 20.0) -> bool:
    """Poll `done()` for up to limit_s seconds, never calling any wait()."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if done():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _background_job(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from collectives import Placement, sparse_all_gather, sparse_reduce_scatter

    own = Placement.from_owners(OWNER, world)
    to = own.with_replicas(EVERYWHERE)
    src = torch.stack([_row(e) for e in own.held(rank)]) if own.held(rank) else torch.empty(0, S)
    out = torch.full((len(to.held(rank)), S), float("nan"), dtype=torch.float64)
    h = sparse_all_gather(src.double(), own, to, async_op=True, algorithm="tree", out=out)
    arrived = _until(lambda: not torch.isnan(out).any())  # relayed rows too, with no wait()
    got = h.wait()  # type: ignore[union-attr]
    # bit-exact on purpose: each row is a copy of the very same `_row(e)`, moved, never computed
    ok = got is out and all(torch.equal(out[i], _row(e)) for i, e in enumerate(to.held(rank)))
    dist.barrier()  # every rank's rows are in before the reduce (the barrier is outside it)
    grads = torch.stack([_row(e) * (rank + 1) for e in to.held(rank)])
    red = torch.full((len(own.owned(rank)), S), float("nan"), dtype=torch.float64)
    hr = sparse_reduce_scatter(grads, to, own, async_op=True, algorithm="tree", out=red)
    folded = _until(lambda: not torch.isnan(red).any())
    hr.wait()  # type: ignore[union-attr]
    return {"arrived": arrived, "rows_ok": ok, "folded": folded, "red": red[:, 0].tolist()}


def test_an_async_tree_runs_all_its_rounds_without_a_wait() -> None:
    out = run_distributed(_background_job, 4)
    for r, got in enumerate(out):
        assert got["arrived"] and got["rows_ok"], (r, got)
        assert got["folded"], (r, got)
    # expert e's copies on all four ranks, rank r's copy scaled by r + 1: (1+2+3+4) (e + 1);
    # sums of small integers, exact in fp64 in any order, so == is safe
    assert out[0]["red"] == [10.0] and out[1]["red"] == [20.0]


def _failing_job(rank: int, world: int) -> str:
    from collectives import Placement, sparse_all_gather
    from collectives.comm import CollectiveError

    own = Placement.from_owners(OWNER, world)
    to = own.with_replicas(EVERYWHERE)
    src = torch.stack([_row(e) for e in own.held(rank)]) if own.held(rank) else torch.empty(0, S)
    if rank == 3:
        time.sleep(6.0)  # joins late: the others' first round times out
        return "late"
    h = sparse_all_gather(
        src.double(), own, to, async_op=True, algorithm="tree", phase="probe", timeout_s=2.0
    )
    try:
        h.wait()  # type: ignore[union-attr]
    except CollectiveError as err:
        return str(err)
    return "no error"


def test_a_failed_background_round_raises_in_wait_with_rank_and_phase() -> None:
    out = run_distributed(_failing_job, 4, timeout_s=60.0)
    failed = [m for m in out[:3] if "timed out" in m or "failed" in m]
    assert failed, out
    assert all("phase probe" in m and m.startswith(f"rank {r}:") for r, m in enumerate(out[:3])
               if m in failed), out  # fmt: skip


def test_the_hand_off_probe_times_jobs_run_on_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from collectives import progress

    ran_on, run = [], progress.Job.run

    def recorded(job: progress.Job) -> None:
        ran_on.append(threading.current_thread().name)
        run(job)

    monkeypatch.setattr(progress.Job, "run", recorded)
    took_s = progress.round_trip_s(calls=5)
    assert ran_on == ["hand-off probe"] * 25  # 20 warm-up calls + 5 timed, none inline
    assert 0.0 < took_s < float("inf")
