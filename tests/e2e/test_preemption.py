"""Preemption ([Note: preemption] in launch/preempt.py): SIGTERM to the torchrun agent mid-run
makes every rank finish its step, write a checkpoint, print one line and exit; the same command
resumes on the uninterrupted trajectory (float64, ≤1e-9). A signal seen by one rank only (the
ranks' agreement) and Ctrl-C: tests/dist/test_pretraining_switches.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.launch import ENV, TINY_JOB, logged_steps, read_metrics, stop, torchrun_cmd
from tests.support.parity import BASE, train_capture

STEPS = 6
# only the preemption and the last step write a checkpoint
ARGS = [*BASE, *TINY_JOB, f"train.steps={STEPS}", "train.ckpt_every=100"]


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + 120
    while logged_steps(run) < n:
        assert proc.poll() is None, f"ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_the_same_command_resumes(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "first.log"
    cmd = torchrun_cmd(2, [*ARGS, "parallel=fssdp", f"hydra.run.dir={run}"])
    job = subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for_steps(run, 2, job, log)
        os.kill(job.pid, signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        stop(job)
    out = log.read_text()
    stops = [line for line in out.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1, out[-4000:]  # rank 0's one line
    stopped_at = int(stops[0].split("after step ")[1].split(":")[0])
    assert 2 <= stopped_at < STEPS, stops
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == [f"step_{stopped_at:08d}"], ckpts
    assert "Traceback" not in out.split("stopped by SIGTERM")[0], out[-4000:]
    # torchrun's agent re-raises the signal after its workers exited (its own exit status is
    # not 0 by design: torch/distributed/launcher/api.py); the workers' logs hold no error.
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in second.stdout, second.stdout[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref = train_capture(0, 1, [*ARGS[len(BASE) :], "parallel=none"], STEPS)["loss"]
    for r in rows:  # steps ≤ stopped_at: the first run; after: the resumed one
        want = ref[r["step"] - 1]
        assert abs(r["loss"] - want) <= 1e-9 * abs(want), (r["step"], r["loss"], want)

