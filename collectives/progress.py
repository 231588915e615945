"""One FIFO worker thread per process group on which sparse collectives run their rounds.

# [Note: rounds in the background]
A tree (or node-relay tree) spAG moves an expert round by round: a relay forwards only what it
has received, so round k + 1 can be issued only once round k has landed, and some thread has to
do that issuing. When it was the caller's, at `wait()`, an async spAG overlapped the work it was
issued behind with its first round only, and an spRS issued from a backward hook ran its later
rounds after the whole backward. Here every sparse collective of a group is handed, at issue,
to that group's worker, which issues its rounds, waits for each and lands it, while the caller
goes on; `wait()` waits for the worker to finish that collective.

Why one thread per group, in FIFO order: ops on one group must be issued in the same order on
every rank (point-to-point messages between two ranks match in issue order; NCCL ignores tags).
The callers submit a group's collectives in the same order on every rank (spAG in layer order
forward, spRS in reverse backward, [Note: three process groups] in fssdp/executor.py), and one
thread running them one after the other keeps that order. Every sparse collective goes through
the worker, one-round ones (`a2a`) too, so nothing else issues on the group while one runs;
direct use of the same group outside `collectives.sparse` (a barrier) must not overlap a
collective in flight. Errors (timeouts name the rank and phase, as before) are raised by the
caller's `wait()`.

On CUDA the worker sets the caller's device and waits for an event recorded on the caller's
stream before it issues (the caller produced the rows there), and the caller's stream waits
for the worker's when the collective is done. Not exercised on a GPU yet ([Note: NCCL] in
collectives/sparse.py). Without torch.distributed, or with one rank, collectives run inline.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


class _Fence:
    """Orders two threads' CUDA streams around a handed-over job (inert on CPU)."""

    def __init__(self) -> None:
        self.device: int | None = None
        self.event: torch.cuda.Event | None = None
        if torch.cuda.is_initialized():  # no CUDA work in flight before its initialisation
            self.device = torch.cuda.current_device()
            self.event = torch.cuda.Event()
            self.event.record()

    def enter(self) -> None:
        """In the receiving thread: same device, after the sender's queued work."""
        if self.event is not None:
            assert self.device is not None
            torch.cuda.set_device(self.device)
            torch.cuda.current_stream().wait_event(self.event)


class Job:
    """One collective handed to a worker; `wait()` returns once it ran (or raises its error)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.entry = _Fence()  # the caller's stream, up to the submit
        self.exit: _Fence | None = None  # the worker's stream, up to the end of the job
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.entry.enter()
            self.fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's wait()
            self.error = err
        finally:
            self.exit = _Fence()
            self.done.set()

    def wait(self) -> None:
        self.done.wait()
        if self.exit is not None:
            self.exit.enter()
        if self.error is not None:
            raise self.error


class _Worker:
    """A daemon thread running submitted jobs one after the other, in submission order."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.jobs.get().run()


# The workers, one per group (keyed by the group object, kept alive with it; None: the default
# group). Module state, like torch.distributed's own group registry: a group's order must hold
# across every caller in the process.
_WORKERS: dict[int, tuple[dist.ProcessGroup | None, _Worker]] = {}
_LOCK = threading.Lock()


def _worker(group: dist.ProcessGroup | None) -> _Worker:
    key = 0 if group is None else id(group)
    with _LOCK:
        hit = _WORKERS.get(key)
        if hit is None or hit[0] is not group:
            hit = (group, _Worker(f"sparse collectives {key}"))
            _WORKERS[key] = hit
        return hit[1]


def submit(group: dist.ProcessGroup | None, world: int, fn: Callable[[], None]) -> Job:
    """Run `fn` (issue a collective and complete it) on `group`'s worker; inline when there
    is nothing to overlap (no process group, or one rank)."""
    job = Job(fn)
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        job.run()
    else:
        _worker(group).jobs.put(job)
    return job


def round_trip_s(calls: int = 200) -> float:
    """Median seconds a job spends handed to a worker and back (a no-op job on a fresh worker
    thread, after 20 warm-up calls): what the hand-off adds to each sparse collective here."""
    worker, times = _Worker("hand-off probe"), []
    for _ in range(calls + 20):
        job = Job(lambda: None)
        t0 = time.perf_counter()
        worker.jobs.put(job)
        job.wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[20:])
