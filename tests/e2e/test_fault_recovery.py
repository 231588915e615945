"""Fault recovery for real: SIGKILL one worker of a torchrun job with --max-restarts; the group
restarts, resumes from the last checkpoint on its own (`train.resume=auto`) and finishes on the
uninterrupted trajectory. And a rank that stops answering (SIGSTOP) ends the others with one line
naming where they waited, and exit code 2, after `parallel.timeout_s`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.harness import free_port
from tests.support.launch import ENV, TINY_JOB, logged_steps, read_metrics, stop
from tests.support.parity import BASE, train_capture

STEPS = 10
ARGS = [*BASE, *TINY_JOB, f"train.steps={STEPS}", "train.progress=false"]


def _wait_until(cond: object, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert proc.poll() is None, (
            f"job ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < end, f"timed out waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _workers(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the agent's worker processes (children whose environment has RANK)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(
                kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv
            )
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if "RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_resumes_and_finishes(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--max-restarts", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "-m", "launch.train", *ARGS, "parallel=fssdp", "train.ckpt_every=2",
        "train.keep_last=2", f"hydra.run.dir={run}",
    ]  # fmt: skip
    job = subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: (run / "checkpoints" / "step_00000002").is_dir(), job, log)
        _wait_until(lambda: logged_steps(run) >= 3, job, log)
        victim = _workers(job.pid)[1]
        os.kill(victim, signal.SIGKILL)
        killed_after = logged_steps(run)
        ref = train_capture(0, 1, [*ARGS[len(BASE) :], "parallel=none"], STEPS)["loss"]
        rc = job.wait(timeout=240)
    finally:
        stop(job)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    assert killed_after < STEPS, "the job finished before the kill: nothing was tested"
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", out)]
    assert len(resumed) == 1 and 2 <= resumed[0] <= killed_after, (resumed, killed_after)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:  # before the checkpoint: the first attempt; after: the restarted group
        want = ref[r["step"] - 1]
        assert abs(r["loss"] - want) <= 1e-9 * abs(want), (r["step"], r["loss"], want)
    rolled = (run / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert rolled, "the first attempt's steps past the checkpoint are kept aside"
    assert [s for s, _ in _checkpoints(run)] == [STEPS - 2, STEPS]  # keep_last=2
    # The restarted attempt took the run-directory lock back as the same job, and let it go.
    assert "took over" not in out and not (run / "run.lock").exists()


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    from launch.checkpoint import list_checkpoints

    return list_checkpoints(run / "checkpoints")


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_with_one_line_and_exit_2(tmp_path: Path) -> None:
    """Two ranks started by hand (not torchrun, which would turn the exit code into 1)."""
    run = tmp_path / "run"
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    args = [*ARGS, "parallel=fssdp", "train.steps=500", "parallel.timeout_s=10"]
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "launch.train", *args, f"hydra.run.dir={run}"],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.DEVNULL,
                stderr=logs[-1].open("w"),
            )
        )
    try:
        _wait_until(lambda: logged_steps(run) >= 2, procs[0], logs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)
        rc = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for line in logs[0].read_text().splitlines() if line.strip()]
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("fssdp: error: rank 0:") and "timed out" in lines[0].lower()
    assert "[in " in lines[0] and "parallel.timeout_s" in lines[0]
