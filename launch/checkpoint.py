"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, keep-last-k.

Layout: `<run>/checkpoints/step_00000100/` (a DCP directory plus `manifest.json`). The keys
inside are the same for every strategy and world size ([Note: checkpoint layout] in
fssdp/strategies/state.py).

# [Note: atomic saves]
A save goes to `step_….tmp/` first. Once every rank has written, rank 0 records each file's size
in `manifest.json` (written last, fsynced) and renames the directory into place. A crash during
a save therefore leaves a `.tmp` directory that nothing reads (and the next save clears) and the
previous checkpoint untouched. Before a load, the manifest is checked against the files on disk,
so a truncated or missing file is named instead of failing deep inside DCP. Retention deletes
only checkpoints older than the one just written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

PREFIX = "step_"
FALLBACK_HINT = (
    "set train.resume_fallback=true to resume from the previous checkpoint "
    "(this one is then kept as <name>.corrupt)"
)
MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names it and what is wrong."""


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"{PREFIX}{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Checkpoints whose save completed (renamed into place), oldest first."""
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


def step_of(path: Path) -> int:
    name = path.name
    if not (name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()):
        raise CheckpointError(f"{path} is not a checkpoint directory (step_XXXXXXXX)")
    return int(name[len(PREFIX) :])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def set_aside(path: Path, why: str, is_main: bool) -> Path:
    """Rename an unusable checkpoint to `<name>.corrupt` (every rank calls; nothing deleted)."""
    target = path.with_name(path.name + ".corrupt")
    barrier()  # every rank is done reading it
    if is_main:
        print(f"fssdp: warning: {why}; moved to {target}, trying the previous one", file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
    barrier()
    return target


def save_checkpoint(
    ckpt_root: Path, step: int, state: dict[str, Any], is_main: bool, keep_last: int
) -> Path:
    final = step_dir(ckpt_root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
    barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if is_main:
        _write_manifest(tmp)
        _replace(tmp, final)
        _fsync_dir(ckpt_root)
        if keep_last > 0:
            older = [p for s, p in list_checkpoints(ckpt_root) if s <= step]
            for p in older[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same step saved again after a resume)
    is swapped out through `.old`, which `recover_interrupted` restores after a crash."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted(ckpt_root: Path) -> None:
    """Put back a checkpoint that a crash left as `step_N.old` between the two renames."""
    if not ckpt_root.is_dir():
        return
    for old in ckpt_root.glob(f"{PREFIX}*.old"):
        final = old.with_name(old.name.removesuffix(".old"))
        if not final.exists():
            os.replace(old, final)


def _write_manifest(path: Path) -> None:
    sizes = {
        f.name: f.stat().st_size
        for f in sorted(path.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    target = path / MANIFEST
    with open(target, "w") as fh:
        json.dump({"files": sizes}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError if a file of the checkpoint is missing or truncated."""
    manifest = path / MANIFEST
    if not (path / ".metadata").exists():
        raise CheckpointError(f"checkpoint {path} has no .metadata file")
    if not manifest.exists():  # written before this format had manifests: nothing to check
        return
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from e
    for name, size in sizes.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is missing file {name}")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt: {name} has "
                f"{f.stat().st_size} bytes, expected {size}"
            )


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Verify, then load `state` in place; any failure is a CheckpointError naming `path`."""
    verify_checkpoint(path)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - any read failure is the checkpoint's fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({first})") from e


def read_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor entry of a checkpoint (flattened keys starting with `prefix`), read in one
    process without torch.distributed."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
