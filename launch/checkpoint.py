"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, checksummed, keep-last-k.

Layout: `<run>/checkpoints/step_00000100/` (a DCP directory plus `manifest.json`). The keys
inside are the same for every strategy and world size ([Note: checkpoint layout] in
fssdp/checkpoint.py).

# [Note: atomic saves]
A save goes to `step_….tmp/` first. Once every rank has written, each rank reads back its share
of the files (DCP's metadata names them all) and takes their CRC32; rank 0 records every file's
size and checksum in `manifest.json` (written last, fsynced) and renames the directory into
place. A crash during a save therefore leaves a `.tmp` directory that nothing reads (and the next
save clears) and the previous checkpoint untouched; a save that fails (a full disk) removes its
`.tmp` and names the cause. Before a load the files are checked against the manifest, sizes then
checksums, split over the ranks, so a truncated, missing or overwritten file is named instead of
failing deep inside DCP or, worse, loading garbage that only shows as a NaN later. Manifests of
older versions hold sizes only; those are checked for sizes. A checkpoint is never deleted by a
resume: unusable ones are renamed `.corrupt`, ones past `train.resume_step` `.rolled_back`.
Retention deletes only checkpoints older than the one just written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from launch.ckpt_errors import CheckpointError, CheckpointMismatch, load_error, save_error
from launch.dist import on_main
from launch.errors import os_error_text

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "verify_checkpoint"]

PREFIX = "step_"
FALLBACK_HINT = (
    "set train.resume_fallback=true to resume from the previous checkpoint "
    "(this one is then kept as <name>.corrupt)"
)
MANIFEST = "manifest.json"
_CHUNK = 8 << 20  # bytes read per checksum update


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


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _raise_first(problem: tuple[str, str] | None) -> None:
    """Every rank raises the first problem any rank found (message, kind), or none does."""
    rank, world = _rank_world()
    if world > 1:
        got: list[Any] = [None] * world
        dist.all_gather_object(got, problem)
        problem = next((p for p in got if p), None)
    if problem:
        raise CheckpointError(*problem)


def _free_name(path: Path, suffix: str) -> Path:
    """`<name><suffix>`, or `<name><suffix>.2`, … : a name that does not exist yet."""
    target, n = path.with_name(path.name + suffix), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}.{n}")
    return target


def set_aside(path: Path, why: str, is_main: bool) -> Path:
    """Rename an unusable checkpoint to `<name>.corrupt` (every rank calls; nothing deleted)."""
    barrier()  # every rank is done reading it

    def move() -> Path:
        target = _free_name(path, ".corrupt")
        print(f"fssdp: warning: {why}; moved to {target}, trying the previous one", file=sys.stderr)
        os.replace(path, target)
        return target

    return on_main(move, is_main)


def roll_back_after(ckpt_root: Path, step: int, is_main: bool) -> list[Path]:
    """Rename the checkpoints after `step` to `<name>.rolled_back` (a resume from an earlier
    step): a later auto-resume must not pick up the abandoned trajectory, and a save of the same
    step must not replace one of them."""

    def move() -> list[Path]:
        moved = []
        for s, p in list_checkpoints(ckpt_root):
            if s > step:
                moved.append(_free_name(p, ".rolled_back"))
                os.replace(p, moved[-1])
        return moved

    return on_main(move, is_main)


def _dir_bytes(path: Path | None) -> int | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir()) if path else None
    except OSError:
        return None


def save_checkpoint(
    ckpt_root: Path, step: int, state: dict[str, Any], is_main: bool, keep_last: int
) -> Path:
    from launch.lock import confirm_held

    final = step_dir(ckpt_root, step)
    tmp = final.with_name(final.name + ".tmp")

    def prepare() -> None:
        confirm_held()  # another job must not be sharing this run directory
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed

    on_main(prepare, is_main)
    rank, world = _rank_world()
    sums: dict[str, tuple[int, str]] = {}
    err: BaseException | None = None
    try:
        meta = dcp.save(state, checkpoint_id=str(tmp))
        names = sorted({".metadata", *(i.relative_path for i in meta.storage_data.values())})
        sums = {n: file_crc(tmp / n) for n in names[rank::world]}
    except (CheckpointException, OSError) as e:  # DCP's failures derive from BaseException
        err = e
    failed = err is not None
    if world > 1:
        got: list[Any] = [None] * world
        dist.all_gather_object(got, (sums, failed))
        sums = {k: v for part, _ in got for k, v in part.items()}
        failed = any(f for _, f in got)
    if failed:  # remove the unfinished save first, so the message tells the free space left
        on_main(lambda: shutil.rmtree(tmp, ignore_errors=True), is_main)
        latest = latest_checkpoint(ckpt_root)
        need = _dir_bytes(latest[1] if latest else None)
        _raise_first((str(save_error(final, err, need)), "io") if err is not None else None)

    def finish() -> None:
        try:
            _write_manifest(tmp, sums)
            _replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise save_error(final, e, _dir_bytes(tmp)) from e
        _fsync_dir(ckpt_root)
        if keep_last > 0:
            older = [p for s, p in list_checkpoints(ckpt_root) if s <= step]
            for p in older[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)

    on_main(finish, is_main)
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


def file_crc(path: Path) -> tuple[int, str]:
    """(size, CRC32 as 8 hex digits) of a file, read in chunks into one reused buffer."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def _write_manifest(path: Path, sums: dict[str, tuple[int, str]]) -> None:
    # "files" (sizes) is what older versions read; "crc32" is checked when present.
    manifest = {
        "version": 2,
        "files": {n: size for n, (size, _) in sorted(sums.items())},
        "crc32": {n: crc for n, (_, crc) in sorted(sums.items())},
    }
    with open(path / MANIFEST, "w") as fh:
        json.dump(manifest, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _check_files(path: Path, rank: int, world: int, checksums: bool) -> tuple[str, str] | None:
    """This rank's share of the manifest check: the first problem as (message, kind)."""
    if not (path / ".metadata").exists():
        return f"checkpoint {path} has no .metadata file", "corrupt"
    manifest = path / MANIFEST
    if not manifest.exists():  # written before this format had manifests: nothing to check
        return None
    try:
        data = json.loads(manifest.read_text())
        sizes, crcs = dict(data["files"]), dict(data.get("crc32", {}))
    except (ValueError, KeyError, TypeError) as e:
        return f"checkpoint {path}: {MANIFEST} is unreadable ({e})", "corrupt"
    for name in sorted(sizes)[rank::world]:
        f = path / name
        if not f.exists():
            return f"checkpoint {path} is missing file {name}", "corrupt"
        size = f.stat().st_size
        if size != sizes[name]:
            return (
                f"checkpoint {path} is truncated or corrupt: {name} has {size} bytes, "
                f"expected {sizes[name]}",
                "corrupt",
            )
        if checksums and name in crcs and (got := file_crc(f)[1]) != crcs[name]:
            return (
                f"checkpoint {path} is corrupt: {name} does not match its recorded checksum "
                f"(crc32 {got}, saved {crcs[name]}; its size is right, its bytes are not)",
                "corrupt",
            )
    return None


def verify_checkpoint(path: Path, checksums: bool = True) -> None:
    """Raise CheckpointError if a file is missing, truncated or (with `checksums`) damaged.
    Under torch.distributed every rank checks a share of the files and all raise alike."""
    rank, world = _rank_world()
    try:
        problem = _check_files(path, rank, world, checksums)
    except OSError as e:
        problem = f"checkpoint {path} cannot be read ({os_error_text(e)})", "io"
    _raise_first(problem)


class StrictLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, which ignores checkpoint entries the state does not ask for (a 2-layer
    checkpoint would load into a 1-layer model silently); this one refuses them."""

    def create_global_plan(self, global_plan: list[Any]) -> list[Any]:
        wanted = {item.dest_index.fqn for plan in global_plan for item in plan.items}
        assert self.metadata is not None
        extra = sorted(set(self.metadata.state_dict_metadata) - wanted)
        if extra:
            raise CheckpointMismatch(
                f"it holds {len(extra)} entries this model does not have, e.g. {extra[0]}"
            )
        return super().create_global_plan(global_plan)


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Verify, then load `state` in place; any failure is a CheckpointError naming `path`."""
    verify_checkpoint(path)
    problem = None
    try:
        dcp.load(state, checkpoint_id=str(path), planner=StrictLoadPlanner())
    except (CheckpointException, OSError, KeyError, ValueError) as e:  # DCP's: BaseException
        err = load_error(path, e)
        problem = str(err), err.kind
    _raise_first(problem)


def all_finite(params: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every parameter on every rank is finite (one pass, one all-reduce): checked
    before each save, so a diverged state never becomes the latest checkpoint."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # DTensor shards
    flags = [torch.isfinite(p.detach()).all() for p in local]
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    bad = (~ok).to(device=device, dtype=torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def recovery_hint(ckpt_root: Path) -> str:
    """What to do after divergence: a lower lr, from a checkpoint saved before it."""
    steps = [s for s, _ in list_checkpoints(ckpt_root)]
    fix = "lower optim.lr or use train.dtype=float32"
    if not steps:
        return f"{fix}, and start again"
    shown = ", ".join(str(s) for s in steps[-6:])
    return (
        f"{fix}, and resume from a checkpoint before the divergence with "
        f"train.resume_step=<step> (saved: {shown}; the latest may already hold diverged weights)"
    )


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
