"""Checkpoint files: atomic saves (a crash at any point of a save leaves the previous checkpoint
the latest and loadable), keep-last-k retention, truncation detection. One process, no
torch.distributed (DCP runs in single-process mode)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt


class Crash(Exception):
    """Stands in for the process dying at the patched point."""


def _state(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    return {"app": {"w": torch.randn(64, 32, generator=g)}, "scheduler": {"step": step}}


def _save(root: Path, step: int, keep_last: int = 0) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ckpt.save_checkpoint(root, step, _state(step), True, keep_last)


def _assert_latest_is(root: Path, step: int) -> None:
    found = ckpt.latest_checkpoint(root)
    assert found is not None and found[0] == step, found
    ckpt.verify_checkpoint(found[1])
    got = ckpt.read_tensors(found[1])
    assert torch.equal(got["app.w"], _state(step)["app"]["w"])  # type: ignore[index]


@pytest.mark.parametrize("where", ["write", "manifest", "rename"])
def test_crash_during_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 1)
    real_save = ckpt.dcp.save

    def dying_save(state: dict, checkpoint_id: str) -> None:
        real_save(state, checkpoint_id=checkpoint_id)
        data = next(Path(checkpoint_id).glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:100])  # a write cut short
        raise Crash

    def die(*args: object, **kwargs: object) -> None:
        raise Crash

    with monkeypatch.context() as m:
        if where == "write":
            m.setattr(ckpt.dcp, "save", dying_save)
        elif where == "manifest":
            m.setattr(ckpt, "_write_manifest", die)
        else:
            m.setattr(ckpt.os, "replace", die)
        with pytest.raises(Crash):
            _save(root, 2)
    assert (root / "step_00000002.tmp").is_dir()  # the debris stays out of the way
    _assert_latest_is(root, 1)
    _save(root, 2)  # the next save clears the debris
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
    _assert_latest_is(root, 2)


def test_crash_while_replacing_the_same_step_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 3)
    real_replace = os.replace
    calls = []

    def second_dies(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:  # final -> .old done, .tmp -> final not yet
            raise Crash
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt.os, "replace", second_dies)
    with pytest.raises(Crash):
        _save(root, 3)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.latest_checkpoint(root) is None  # only step_3.old and step_3.tmp remain
    ckpt.recover_interrupted(root)
    _assert_latest_is(root, 3)


def test_keep_last_k_and_never_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]
    _save(root, 2, keep_last=1)  # after a resume from an earlier step: newer ones are not older
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3, 4]
    _save(root, 5, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [5]
    for step in (6, 7):
        _save(root, step, keep_last=0)  # 0 keeps all
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [5, 6, 7]


def test_truncated_or_missing_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    path = _save(root, 1)
    data = next(path.glob("*.distcp"))
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    with pytest.raises(ckpt.CheckpointError, match=rf"{data.name} has {size // 2} bytes"):
        ckpt.verify_checkpoint(path)
    data.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"missing file {data.name}"):
        ckpt.load_checkpoint(path, _state(1))
