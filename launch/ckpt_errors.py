"""Why a checkpoint could not be saved or loaded, in one line.

torch.distributed.checkpoint (DCP) reports every failure as a `CheckpointException`, which derives
from BaseException (an `except Exception` misses it) and wraps each rank's own exception. These
helpers find the cause (a full disk behind "unexpected pos 704 vs 598", a size mismatch, a
damaged file), sort it (corrupt | mismatch | io), and, for a mismatch, name the config keys that
differ from the run's config.yaml.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from launch.errors import UserError, os_error_fix, os_error_text

# kinds: corrupt (damaged or unreadable content: train.resume_fallback may skip it), diverged
# (non-finite parameters: likewise), mismatch (another model or data config: fallback would not
# help, the config must change), io (the file system failed: fix it, the checkpoint may be fine).
FALLBACK_KINDS = ("corrupt", "diverged")
_MISMATCH_TEXT = ("size mismatch", "missing key", "unexpected key", "does not have")
# Keys that a resume may change freely; left out of the "config differs in …" list.
_FREE_KEYS = {"train.steps", "train.resume", "train.resume_fallback", "train.resume_step"}
_FREE_KEYS |= {"train.progress", "train.log_every", "train.val_every", "train.ckpt_every"}
_FREE_KEYS |= {"train.checkpoints", "train.load_figures"}


class CheckpointError(UserError):
    """A checkpoint that cannot be saved or used; the message names it and the cause."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


class CheckpointMismatch(ValueError):
    """Raised inside DCP's planning when the checkpoint holds entries this run would not load."""


def failure_cause(e: BaseException) -> BaseException:
    """The exception behind a DCP failure (the first rank's). A KeyboardInterrupt or SystemExit
    that DCP wrapped is raised again: it is not a checkpoint problem and must not be swallowed."""
    if isinstance(e, CheckpointException):
        excs = [pair[0] if isinstance(pair, tuple) else pair for pair in e.failures.values()]
        for exc in excs:
            if not isinstance(exc, Exception):
                raise exc
        return failure_cause(excs[0]) if excs else e
    return e


def os_cause(e: BaseException) -> OSError | None:
    """The OSError behind `e`, if any (torch's writer turns ENOSPC into "unexpected pos")."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def cause_text(e: BaseException) -> str:
    """`Type: first line` of an exception (the OSError behind it when there is one)."""
    os_err = os_cause(e)
    if os_err is not None:
        return os_error_text(os_err)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_error(path: Path, e: BaseException) -> CheckpointError:
    """One CheckpointError for a failed `dcp.load` of `path`."""
    root = failure_cause(e)
    text = cause_text(root)
    if os_cause(root) is not None:
        return CheckpointError(f"checkpoint {path} cannot be read ({text})", "io")
    if isinstance(root, CheckpointMismatch) or any(k in text.lower() for k in _MISMATCH_TEXT):
        return CheckpointError(f"checkpoint {path} does not fit this run ({text})", "mismatch")
    return CheckpointError(f"checkpoint {path} cannot be loaded, it is damaged ({text})")


def save_error(final: Path, e: BaseException, need: int | None) -> CheckpointError:
    """One CheckpointError for a failed save of `final`, saying how full the disk is."""
    root = failure_cause(e)
    os_err = os_cause(root)
    text = cause_text(root)
    free = _free_bytes(final.parent)
    full = (os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        free is not None and need is not None and free < need
    )
    space = ""
    if free is not None:
        space = f"; {_mib(free)} free on {final.parent}"
        space += f", a checkpoint needs about {_mib(need)}" if need else ""
    short_write = "unexpected pos" in text  # torch's zip writer on a write cut short
    if full or short_write:
        fix = "free space, lower train.keep_last, or move hydra.run.dir"
    elif os_err is not None:
        fix = os_error_fix(os_err)
    else:
        fix = "check the file system of hydra.run.dir"
    return CheckpointError(
        f"saving checkpoint {final} failed ({_label(full, short_write)}{text}{space}): "
        f"{fix}; earlier checkpoints are untouched",
        "io",
    )


def _label(full: bool, short_write: bool) -> str:
    return "disk full: " if full else ("a short write, is the disk full? " if short_write else "")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def config_change(run_dir: Path, current: dict[str, Any]) -> str:
    """Which keys of `current` differ from the run's config.yaml (model keys first)."""
    from omegaconf import OmegaConf

    saved_path = run_dir / "config.yaml"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not YAML: say so, no diff
        return f"the run's {saved_path} cannot be read ({type(e).__name__}), so no diff is shown"
    a, b = _flatten(saved), _flatten(current)
    unset = "<unset>"
    diff = [
        k
        for k in sorted(a.keys() | b.keys())
        if k not in _FREE_KEYS and a.get(k, unset) != b.get(k, unset)
    ]
    keys = [k for k in diff if k.startswith("model.")] or diff
    if not keys:
        return (
            f"this config matches {saved_path}, so the checkpoint was written by other code or "
            "is damaged: use train.resume_step=<earlier step> or a new hydra.run.dir"
        )
    shown = ", ".join(f"{k} ({a.get(k, unset)} → {b.get(k, unset)})" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    return (
        f"this config differs from the run's {saved_path} in {shown}{more}: resume with the "
        "run's settings, or start a new hydra.run.dir"
    )
