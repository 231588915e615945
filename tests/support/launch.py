"""Subprocess launchers for end-to-end tests: `python -m launch.train`, torchrun, and cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.harness import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_cmd(
    nproc: int, args: list[str], *extra: str, module: str = "launch.train"
) -> list[str]:
    """A standalone-style torchrun command line (c10d rendezvous on a free loopback port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        *extra,
        "-m",
        module,
        *args,
    ]


def torchrun(nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(nproc, args), env=ENV, capture_output=True, text=True, timeout=timeout
    )


def python_train(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.train", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stop(proc: subprocess.Popen) -> None:
    """End a torchrun agent left running by a failure: SIGTERM lets it stop its workers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# A two-layer GPT-MoE on synthetic data in float64 (tests/support/parity.py BASE first), logging
# every step: the job of the torchrun fault and preemption tests.
TINY_JOB = [
    "model=gpt_moe_tiny",
    "model.n_layers=2",
    "data=synthetic",
    "train.log_every=1",
    "data.val_batches=0",
]


def logged_steps(run: Path) -> int:
    """The last step `run`'s metrics.jsonl has logged (0: none yet)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0
