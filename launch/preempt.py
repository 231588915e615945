"""Preemption: SIGTERM, SIGUSR1 and SIGINT stop a run at a step boundary, with a checkpoint.

[Note: preemption]
Slurm sends SIGTERM before it kills a job (time limit, preemption, scancel; SIGKILL follows
after `KillWait`, 30 s by default) and, with `--signal=USR1@<seconds>`, SIGUSR1 that long
before the time limit (launch/slurm/train.sbatch forwards it and requeues the job); Ctrl-C is
SIGINT. The handler only notes the signal. After every step all ranks agree whether to stop:
one all-reduce (MAX) of a one-element flag (signals reach ranks at different moments, and a
rank that stopped alone would leave the others waiting in the next collective). When one rank
has seen a signal, every rank stops after that same step, writes a checkpoint (unless that step
just wrote one), rank 0 prints one line, and the process exits 0 through `SystemExit`, whose
way out (launch/train.py) releases the run-directory lock; it is also released here. The same
command resumes from that checkpoint (`train.resume=auto`) on the uninterrupted trajectory:
nothing is lost beyond the step in flight when the signal came, which is finished.

Time budget: under torchrun the agent forwards SIGTERM/SIGINT to the workers and SIGKILLs
them 30 s later (torch/distributed/elastic/multiprocessing/api.py, `_close(death_sig,
timeout=30)`; the agent's `shutdown_timeout`): the step in flight and the checkpoint must fit
in it. Raise it with `torchrun --shutdown_timeout 120` or `TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120`
(and Slurm's lead time with `--signal=B:USR1@<seconds>`). The agent does not forward SIGUSR1
unless `TORCHELASTIC_SIGNALS_TO_HANDLE` lists it (the sbatch script sets it); without that,
SIGUSR1 kills the agent. A repeated signal is ignored (the agent's SIGKILL is the hard stop).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """The signal handlers of one `Trainer.fit` and the per-step agreement to stop."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: int = 0  # the first signal's number (0: none)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle SIGNALS (main thread only: elsewhere Python cannot install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum

    def agreed(self) -> int:
        """Every rank calls this after every step: the signal to stop for (the same on every
        rank: the highest number any rank received), 0 to go on. One small all-reduce."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stop_line(signum: int, step: int, path: Any) -> str:
    if path is None:  # train.checkpoints=false
        return (
            f"fssdp: stopped by {signal_name(signum)} after step {step}: no checkpoint written "
            "(train.checkpoints=false), so the run cannot resume from this step"
        )
    return (
        f"fssdp: stopped by {signal_name(signum)} after step {step}: checkpoint {path} "
        "written; run the same command again to resume from it"
    )


def stop_run(trainer: Any, signum: int, saved: Any) -> None:
    """Every rank: checkpoint this step (unless `saved`, this step's checkpoint, exists, or
    train.checkpoints is false), rank 0 prints one line, the lock is released, exit 0
    (SystemExit)."""
    from launch.lock import release_held

    path = saved if saved is not None or not trainer.cfg.checkpoints else trainer.save()
    if trainer.info.is_main:
        print(stop_line(signum, trainer.step, path), flush=True)
    trainer.metrics.close()
    release_held()
    raise SystemExit(0)
