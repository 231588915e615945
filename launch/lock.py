"""One job per run directory: `<run>/run.lock`, held by global rank 0 of the job.

# [Note: run-directory lock]
Two jobs on one run directory (a requeue while the old job still runs, a typo) delete each
other's `step_….tmp/`, log every step twice and resume from each other's checkpoints. So global
rank 0 creates `run.lock` with O_CREAT|O_EXCL (atomic on local file systems and NFSv3+), holding
{host, pid, process start time, job}, and touches it every HEARTBEAT_S seconds from a daemon
thread; the other ranks wait for its verdict (`launch.dist.on_main`), so on a shared file system
exactly one process decides. An existing lock is taken over only when it is stale:
- the same job wrote it: a torchrun restart (`--max-restarts`; the job id is kept in the torchrun
  agent's store, which outlives the workers, and may start rank 0 on another node) or a Slurm
  requeue (same SLURM_JOB_ID and step);
- same host, and its process is gone (or the pid now belongs to another process: start times
  differ);
- another host, and no heartbeat for STALE_S seconds (we cannot see its processes; NFS updates
  mtimes with the server's clock, and STALE_S leaves room for skew and attribute caching).
Otherwise the job refuses at once, naming the holder and how to clear a lock that is really
stale (delete the file). Taking over renames the stale file away first (only one contender's
rename succeeds), then creates a new one. Rank 0 removes the lock when the job ends; before each
checkpoint it checks the lock is still its own (a lock deleted by hand is taken again; a lock
taken by another job stops this one before it writes).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from launch.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 15.0
STALE_S = 120.0

_HELD: RunLock | None = None


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None when unknown/gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # zombies are dead


def _alive(pid: int, start: str | None) -> bool:
    if Path("/proc/self/stat").exists():
        now = _start_ticks(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_id() -> str:
    """What identifies this job across its own restarts (see the note)."""
    if "SLURM_JOB_ID" in os.environ:
        env = os.environ
        step = env.get("SLURM_STEP_ID", "batch")
        return f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}:{env['SLURM_JOB_ID']}:{step}"
    from launch.dist import job_token

    return job_token()


class RunLock:
    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fssdp-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed or unreachable: confirm_held() deals with it before a save

    def is_ours(self) -> bool:
        return _read(self.path) == self.record

    def release(self) -> None:
        self._stop.set()
        try:
            if self.is_ours():
                self.path.unlink()
        except OSError:
            pass  # the directory is gone or read-only now: nothing to clean


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _create(path: Path, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _stale(path: Path, holder: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """Why the lock at `path` may be taken over, or None when its holder may still run."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was just released"
    if holder is None:  # unreadable or half written by a job killed while creating it
        return f"it is unreadable and {age:.0f} s old" if age > 10 else None
    if holder.get("job") == me["job"]:
        return "it is this job's own (restarted)"
    if holder.get("host") == me["host"]:
        if not _alive(int(holder.get("pid", -1)), holder.get("start")):
            return f"process {holder.get('pid')} on this host is gone"
        return None
    if age > STALE_S:
        return f"no heartbeat from host {holder.get('host')} for {age:.0f} s"
    return None


def _refusal(path: Path, holder: dict[str, Any] | None) -> str:
    h = holder or {}
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        age = 0.0
    who = f"host {h.get('host', '?')} pid {h.get('pid', '?')} (job {h.get('job', '?')})"
    return (
        f"run directory {path.parent} is in use by {who}, heartbeat {age:.0f} s ago: wait for "
        f"that job to end or use another hydra.run.dir; if it is not running any more, delete "
        f"{path} (a lock from another host counts as stale after {STALE_S:.0f} s without heartbeat)"
    )


def acquire(run_dir: Path) -> RunLock:
    """Take the run directory's lock (global rank 0 only) or raise a UserError naming its holder.
    Creates the run directory; an OSError here (read-only, a file in the way) goes to the caller."""
    global _HELD
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"hydra.run.dir {run_dir} is a file, not a directory: use another path")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_ticks(os.getpid()),
        "job": job_id(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for _ in range(5):
        if _create(path, me):
            _HELD = RunLock(path, me)
            return _HELD
        holder = _read(path)
        why = _stale(path, holder, me)
        if why is None:
            raise UserError(_refusal(path, holder))
        aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(path, aside)  # only one contender's rename finds the file
        except FileNotFoundError:
            continue
        aside.unlink(missing_ok=True)
        if why != "it is this job's own (restarted)":
            print(f"fssdp: warning: took over the stale lock {path} ({why})", file=sys.stderr)
    raise UserError(f"could not take the lock {path}: other jobs keep taking it; retry")


def confirm_held() -> None:
    """Before a checkpoint (rank 0): the lock must still be ours. Deleted: take it again.
    Another job's: stop before writing anything."""
    lock = _HELD
    if lock is None:
        return
    if lock.is_ours():
        return
    holder = _read(lock.path)
    if holder is None and _create(lock.path, lock.record):
        print(
            f"fssdp: warning: {lock.path} was removed while the job ran; taken again",
            file=sys.stderr,
        )
        return
    raise UserError(
        f"lost the run-directory lock {lock.path} to host {(holder or {}).get('host', '?')} pid "
        f"{(holder or {}).get('pid', '?')}: another job is using {lock.path.parent}; stopping "
        "before writing the checkpoint (stop one of the jobs)"
    )


def visible(path: Path, record: dict[str, Any], timeout_s: float = 10.0) -> bool:
    """Whether this process sees the lock `record` at `path` (another node, after rank 0 took
    it): False means the run directory is not on a file system shared by every node. Retried
    for `timeout_s`: NFS may cache the lookup that found no file a moment ago."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _read(path) == record:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def release_held() -> None:
    global _HELD
    if _HELD is not None:
        _HELD.release()
        _HELD = None
