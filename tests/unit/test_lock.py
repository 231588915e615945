"""The run-directory lock (launch/lock.py): a second job refuses naming the holder; a stale lock
(dead pid on this host, no heartbeat from another host, this job's own after a restart) does not
block; the lock is checked again before each checkpoint. One process, no torch.distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import lock
from launch.errors import UserError


@pytest.fixture(autouse=True)
def _no_lock_left() -> object:
    yield
    lock.release_held()


def _plant(run: Path, **holder: object) -> Path:
    """A lock file written by some other job."""
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": "elsewhere", "pid": 1, "start": None, "job": "other-job", "since": "x"}
    record.update(holder)
    path = run / lock.LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_acquire_creates_and_release_removes(tmp_path: Path) -> None:
    run = tmp_path / "a" / "run"  # parents are created
    held = lock.acquire(run)
    record = json.loads((run / lock.LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == lock.socket.gethostname()
    assert held.is_ours()
    lock.release_held()
    assert not (run / lock.LOCK_NAME).exists()


def test_a_live_holder_on_this_host_refuses_naming_it(tmp_path: Path) -> None:
    me = lock.socket.gethostname()
    start = lock._start_ticks(os.getppid())
    path = _plant(tmp_path, host=me, pid=os.getppid(), start=start)
    before = path.read_text()
    with pytest.raises(UserError) as err:
        lock.acquire(tmp_path)
    line = str(err.value)
    assert f"in use by host {me} pid {os.getppid()}" in line and "\n" not in line
    assert str(path) in line and "delete" in line
    assert path.read_text() == before  # the holder's lock is untouched


def test_a_dead_holder_on_this_host_or_a_reused_pid_is_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    me = lock.socket.gethostname()
    _plant(tmp_path, host=me, pid=_dead_pid())
    lock.acquire(tmp_path)
    assert "took over the stale lock" in capsys.readouterr().err
    lock.release_held()
    _plant(tmp_path, host=me, pid=os.getppid(), start="1")  # same pid, another process
    lock.acquire(tmp_path)
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_another_host_is_stale_only_without_heartbeat(tmp_path: Path) -> None:
    path = _plant(tmp_path, host="node-b", pid=4242)
    with pytest.raises(UserError, match=r"in use by host node-b pid 4242 .*after 120 s"):
        lock.acquire(tmp_path)
    old = time.time() - lock.STALE_S - 5
    os.utime(path, (old, old))
    lock.acquire(tmp_path)  # no heartbeat for > STALE_S: taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_same_job_restarted_takes_its_lock_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchrun --max-restarts may start rank 0 on another node: the job id decides."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    _plant(tmp_path, host="node-b", pid=4242, job=lock.job_id())
    lock.acquire(tmp_path)
    assert "took over" not in capsys.readouterr().err


def test_a_half_written_lock_blocks_briefly_then_is_stale(tmp_path: Path) -> None:
    path = tmp_path / lock.LOCK_NAME
    path.write_text('{"host": "node')
    with pytest.raises(UserError, match="in use by host"):
        lock.acquire(tmp_path)
    os.utime(path, (time.time() - 60, time.time() - 60))
    lock.acquire(tmp_path)


def test_a_run_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(UserError, match=f"hydra.run.dir {f} is a file"):
        lock.acquire(f)
    with pytest.raises(NotADirectoryError):  # train.py turns it into one line
        lock.acquire(f / "sub")


def test_confirm_before_a_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    held = lock.acquire(tmp_path)
    lock.confirm_held()  # ours: nothing happens
    held.path.unlink()  # removed by hand while the job runs: taken again
    lock.confirm_held()
    assert held.is_ours() and "taken again" in capsys.readouterr().err
    _plant(tmp_path, host="node-b", pid=99)  # another job took the directory
    with pytest.raises(UserError, match="lost the run-directory lock .* host node-b pid 99"):
        lock.confirm_held()
    lock.release_held()
    assert (tmp_path / lock.LOCK_NAME).exists()  # not ours: release leaves it


def test_heartbeat_touches_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    held = lock.acquire(tmp_path)
    old = time.time() - 1000
    os.utime(held.path, (old, old))
    deadline = time.monotonic() + 5
    while held.path.stat().st_mtime < old + 500:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.02)


def test_other_nodes_check_they_see_the_lock(tmp_path: Path) -> None:
    """A node whose hydra.run.dir is not the shared one does not see rank 0's lock."""
    held = lock.acquire(tmp_path)
    assert lock.visible(held.path, held.record, timeout_s=0)
    assert not lock.visible(tmp_path / "elsewhere" / lock.LOCK_NAME, held.record, timeout_s=0.3)
    assert not lock.visible(held.path, {**held.record, "pid": 1}, timeout_s=0)
