"""Checkpoint files: atomic saves (a crash at any point of a save leaves the previous checkpoint
the latest and loadable), keep-last-k retention, truncation detection. One process, no
torch.distributed (DCP runs in single-process mode)."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt


class Crash(BaseException):
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


# --- damage, mismatch, failed saves: one CheckpointError naming the checkpoint and the cause ---


def _load(path: Path, state: dict[str, object]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ckpt.load_checkpoint(path, state)


def test_damage_that_keeps_the_size_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path / "checkpoints", 1)
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[1000:5096] = os.urandom(4096)  # 4 KiB inside the file: its size does not change
    data.write_bytes(bytes(raw))
    ckpt.verify_checkpoint(path, checksums=False)  # sizes alone cannot see it
    with pytest.raises(ckpt.CheckpointError, match=f"{data.name} does not match its recorded"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="checksum") as err:
        _load(path, _state(1))
    assert err.value.kind == "corrupt" and str(path) in str(err.value)


def test_old_manifests_with_sizes_only_still_load(tmp_path: Path) -> None:
    path = _save(tmp_path / "checkpoints", 1)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["version"] == 2 and set(manifest["crc32"]) == set(manifest["files"])
    (path / ckpt.MANIFEST).write_text(json.dumps({"files": manifest["files"]}))
    state = _state(0)
    _load(path, state)
    assert torch.equal(state["app"]["w"], _state(1)["app"]["w"])  # type: ignore[index]
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[:512] = os.urandom(512)  # without checksums only loading can tell
    data.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded, it is damaged") as err:
        _load(path, _state(1))
    assert err.value.kind == "corrupt"


def test_a_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path: Path) -> None:
    path = _save(tmp_path / "checkpoints", 1)
    cases = {
        "Size mismatch": {"app": {"w": torch.empty(64, 16)}, "scheduler": {"step": 0}},
        "Missing key": {"app": {"w": torch.empty(64, 32), "v": torch.empty(2)}, "scheduler": {}},
        "entries this model does not have": {"app": {"w": torch.empty(64, 32)}},  # no scheduler
    }
    for want, state in cases.items():
        with pytest.raises(ckpt.CheckpointError, match=want) as err:
            _load(path, state)
        assert err.value.kind == "mismatch", want


def _write_fails(exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint import filesystem

    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(filesystem, "_write_item", fail)


def test_a_failed_save_names_the_full_disk_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 1)
    before = {p: p.read_bytes() for p in (root / "step_00000001").iterdir()}
    _write_fails(OSError(errno.ENOSPC, "No space left on device"), monkeypatch)
    with pytest.raises(ckpt.CheckpointError) as err:
        _save(root, 2)
    line = str(err.value)
    assert "saving checkpoint" in line and "step_00000002" in line and "\n" not in line
    assert "disk full" in line and "[ENOSPC]" in line and "MiB free" in line
    assert "earlier checkpoints are untouched" in line
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # no .tmp left
    assert {p: p.read_bytes() for p in (root / "step_00000001").iterdir()} == before


def test_keyboard_interrupt_inside_dcp_is_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP wraps every rank's exception, KeyboardInterrupt included, in CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    from launch.ckpt_errors import failure_cause

    _write_fails(KeyboardInterrupt(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "checkpoints", 1)
    with pytest.raises(SystemExit):
        failure_cause(CheckpointException("x", {0: (SystemExit(3), None)}))  # type: ignore[dict-item]


def test_nothing_is_deleted_when_checkpoints_are_moved_aside(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
    moved = ckpt.roll_back_after(root, 1, True)
    assert [p.name for p in moved] == ["step_00000002.rolled_back", "step_00000003.rolled_back"]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1]
    _save(root, 2)  # the same step again, on the new trajectory: the old one is not replaced
    ckpt.roll_back_after(root, 1, True)
    assert (root / "step_00000002.rolled_back.2").is_dir()
    assert ckpt.set_aside(root / "step_00000001", "bad", True).name == "step_00000001.corrupt"
    _save(root, 1)
    assert ckpt.set_aside(root / "step_00000001", "bad", True).name == "step_00000001.corrupt.2"


def test_config_change_names_the_keys(tmp_path: Path) -> None:
    from launch.ckpt_errors import config_change

    (tmp_path / "config.yaml").write_text(
        "model:\n  d_model: 64\n  n_layers: 2\ntrain:\n  steps: 2\n  seq_len: 32\n"
    )
    now = {"model": {"d_model": 128, "n_layers": 2}, "train": {"steps": 9, "seq_len": 16}}
    line = config_change(tmp_path, now)
    assert "model.d_model (64 → 128)" in line and "seq_len" not in line  # model keys first
    now["model"]["d_model"] = 64
    line = config_change(tmp_path, now)
    assert "train.seq_len (32 → 16)" in line and "train.steps" not in line  # steps may change
    assert "no diff" in config_change(tmp_path / "missing", now)


def test_all_finite() -> None:
    good = [torch.ones(3), torch.zeros(2, 2)]
    assert ckpt.all_finite(good, torch.device("cpu"))
    assert not ckpt.all_finite([*good, torch.tensor([1.0, float("nan")])], torch.device("cpu"))
    assert not ckpt.all_finite([torch.tensor([float("inf")])], torch.device("cpu"))
