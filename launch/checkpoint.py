"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, keep-last-k.

Layout: `<run>/checkpoints/step_00000100/` (a DCP directory). A save goes to `step_….tmp/`
first and is renamed once every rank has finished writing, so a crash during a save leaves the
previous checkpoint usable and never a half-written one under a final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

PREFIX = "step_"


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"{PREFIX}{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            if (p / ".metadata").exists():
                found.append((int(p.name[len(PREFIX) :]), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    ckpt_root: Path, step: int, state: dict[str, Any], is_main: bool, keep_last: int
) -> Path:
    final = step_dir(ckpt_root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if is_main:
        if final.exists():  # the same step saved again (after a resume): keep the new one
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        if keep_last > 0:
            for _, p in list_checkpoints(ckpt_root)[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    dcp.load(state, checkpoint_id=str(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
