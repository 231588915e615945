"""Warm-up the forkserver runs once, so that every rank it forks starts warm.

A rank's first training step paid about 2 s that later steps do not: modules torch, hydra and
the runtime import on first use (torch._dynamo alone is 1.4 s), hydra's first compose, the
first model build, autograd and optimizer step. Forked ranks inherit what the server has done,
so the server does it once here (`PRELOAD` in tests/support/harness.py imports this module): a
world-1 `parallel=none` step of the tiny model, with no process group and one thread, so the
server stays a single-threaded process that is safe to fork.
"""

from __future__ import annotations

import importlib
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

# Imported on first use by a training step (found by diffing sys.modules around one).
LAZY = [
    "torch._dynamo",
    "fssdp.planner",
    "fssdp.executor",
    "fssdp.strategies.ddp",
    "fssdp.strategies.ep",
    "fssdp.strategies.fsdp",
    "fssdp.strategies.fssdp",
    "fssdp.strategies.none",
]


def _warm() -> None:
    from launch.build import build_trainer
    from launch.dist import DistInfo
    from launch.train import compose_config
    from tests.support.parity import BASE

    torch.set_num_threads(1)
    for m in LAZY:
        importlib.import_module(m)
    job, _ = compose_config([*BASE, "train.steps=1", "parallel=none"])
    cfg: Any = OmegaConf.to_object(job)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), Path(tmp))
        trainer.train_step()
        trainer.metrics.close()  # joins tensorboard's writer thread
    if threading.active_count() != 1:  # forking a threaded process is unsafe: say so
        names = [t.name for t in threading.enumerate()]
        raise RuntimeError(f"tests/support/warm.py left threads running: {names}")


_warm()
