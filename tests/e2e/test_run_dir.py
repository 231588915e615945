"""The run directory under real jobs: a second job on a running job's directory refuses at once
naming the holder, and a killed job's lock does not block its restart; a rank that fails alone
is named by the others ("rank 0 failed: …", not "a rank stopped answering"); a full and a
read-only file system (a real tmpfs, where this machine lets the tests mount one) end with one
line and leave the saved checkpoints as they were."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_fault_recovery import _wait_until
from tests.support.driver import Driver, hashes, one_line
from tests.support.launch import ENV, logged_steps, stop, torchrun_cmd

SMALL = [
    "model=gpt_moe_tiny",
    "model.n_layers=1",
    "data=synthetic",
    "train.global_batch_size=2",
    "train.seq_len=16",
    "train.log_every=1",
    "train.progress=false",
    "data.val_batches=0",
]


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    with Driver() as d:
        yield d


@pytest.mark.slow
def test_a_second_job_refuses_and_a_killed_job_does_not_block(
    tmp_path: Path, driver: Driver
) -> None:
    run, log = tmp_path / "run", tmp_path / "first.log"
    cmd = [sys.executable, "-m", "launch.train", *SMALL, "parallel=none", "train.steps=100000"]
    first = subprocess.Popen(
        [*cmd, f"hydra.run.dir={run}"], env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w")
    )
    again = [*SMALL, "parallel=none", "train.steps=2", f"hydra.run.dir={run}"]
    try:
        _wait_until(lambda: logged_steps(run) >= 1, first, log)
        second = driver.run(again)
        assert second["code"] == 2, second["stderr"][-3000:]
        line = one_line(second["stderr"])
        assert f"in use by host {os.uname().nodename} pid {first.pid}" in line, line
        assert first.poll() is None  # the first job was not disturbed
        os.kill(first.pid, signal.SIGKILL)  # its lock stays behind
        first.wait()
    finally:
        stop(first)
    third = driver.run(again)
    assert third["code"] == 0, third["stderr"][-3000:]
    assert f"took over the stale lock {run}/run.lock (process {first.pid}" in third["stderr"]
    assert not (run / "run.lock").exists()  # released at the end


@pytest.mark.slow
def test_a_rank_that_fails_alone_is_named_by_the_others(tmp_path: Path) -> None:
    """Only rank 0 writes metrics.jsonl; here it is a directory, so rank 0 alone fails."""
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)
    # A slow agent monitor: the surviving rank prints its line before torchrun stops it.
    cmd = torchrun_cmd(2, [*SMALL, "parallel=ddp", "train.steps=2", f"hydra.run.dir={run}"])
    cmd[cmd.index("--rdzv-backend") : cmd.index("--rdzv-backend")] = ["--monitor-interval", "5"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    errors = [line for line in p.stderr.splitlines() if "fssdp: error:" in line]
    assert p.returncode != 0 and len(errors) == 2, p.stderr[-4000:]
    cause = f"{run}/metrics.jsonl: Is a directory [EISDIR]"
    assert any(f"fssdp: error: {cause}" in line for line in errors), errors
    assert any(f"fssdp: error: rank 0 failed: {cause}" in line for line in errors), errors
    ours = str(Path(__file__).resolve().parents[2] / "launch")  # torchrun prints its own traceback
    assert "stopped answering" not in p.stderr and ours not in p.stderr


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (a real full or read-only file system); skipped where mounting is refused."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_and_read_only_file_systems_are_one_line(tmpfs: Path, driver: Driver) -> None:
    run = tmpfs / "run"
    args = [*SMALL, "parallel=none", "train.steps=3", "train.ckpt_every=1", f"hydra.run.dir={run}"]
    full = driver.run(args)  # a checkpoint is ~3 MiB: the second does not fit
    assert full["code"] == 2, full["stderr"][-3000:]
    line = one_line(full["stderr"])
    assert "saving checkpoint" in line and "step_00000002 failed (disk full" in line, line
    # ENOSPC itself or torch's "unexpected pos" short write, depending on where the write failed
    assert "MiB free" in line and "earlier checkpoints are untouched" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    before = hashes(run)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    ro, fresh = driver.run(args), driver.run([*args[:-1], f"hydra.run.dir={tmpfs}/new"])
    for got, where in ((ro, run / "run.lock"), (fresh, tmpfs / "new")):
        assert got["code"] == 2, got["stderr"][-3000:]
        line = one_line(got["stderr"])
        assert (
            f"{where}: Read-only file system [EROFS]" in line and "writable hydra.run.dir" in line
        )
    assert hashes(run) == before
