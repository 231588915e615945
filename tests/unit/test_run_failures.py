"""File-system failures and divergence in one process (`launch.train.main` at world 1): each ends
with one line naming the path and the cause, exit code 2, and nothing saved is lost; a job whose
checkpoint directory is deleted under it recreates it. The failures are simulated by patching the
call that meets them (tests run as root, for whom permissions do not fail): a stale NFS handle
while logging, a directory that cannot be created; the e2e tests use real read-only and full
file systems where the machine allows mounting one."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from launch import train
from launch.errors import UserError
from tests.support.driver import one_line

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SMALL = [
    "model=gpt_moe_tiny",
    "model.n_layers=1",
    "parallel=none",
    "data=synthetic",
    "train.global_batch_size=2",
    "train.seq_len=16",
    "train.log_every=1",
    "train.progress=false",
    "data.val_batches=1",
]


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    code: Any = 0
    try:
        train.main([*SMALL, *args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_a_stale_nfs_handle_while_logging_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.metrics import MetricsLogger

    run = tmp_path / "run"

    def stale(self: MetricsLogger, record: dict) -> None:
        raise OSError(errno.ESTALE, "Stale file handle", str(self.path))

    monkeypatch.setattr(MetricsLogger, "log", stale)
    code, err = _main(["train.steps=2", f"hydra.run.dir={run}"], capsys)
    line = one_line(err)
    assert code == 2 and f"{run}/metrics.jsonl: Stale file handle [ESTALE]" in line
    assert "network file system" in line and "train.resume=auto" in line
    assert not (run / "run.lock").exists()  # released on the way out


def test_a_run_dir_that_cannot_be_created_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a non-root user sees for a hydra.run.dir under a directory they may not write."""
    run = tmp_path / "locked_parent" / "run"
    real = Path.mkdir

    def denied(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == run:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    code, err = _main(["train.steps=1", f"hydra.run.dir={run}"], capsys)
    line = one_line(err)
    assert code == 2 and f"cannot use run directory {run} (hydra.run.dir)" in line
    assert "Permission denied [EACCES]: check its permissions" in line


def test_checkpoints_deleted_under_a_running_job_are_recreated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.trainer import Trainer

    run = tmp_path / "run"
    real = Trainer.save

    def delete_then_save(self: Trainer) -> Path:
        if self.step == 2:
            shutil.rmtree(self.ckpt_root)  # someone cleans up while the job runs
        return real(self)

    monkeypatch.setattr(Trainer, "save", delete_then_save)
    code, err = _main(["train.steps=3", "train.ckpt_every=1", f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000003",
    ]


def test_no_checkpoint_of_non_finite_parameters(tmp_path: Path) -> None:
    """A finite loss does not prove finite weights: the save itself checks."""
    from launch.build import build_trainer
    from launch.dist import DistInfo

    job, _ = train.compose_config(SMALL)
    cfg: Any = OmegaConf.to_object(job)
    trainer = build_trainer(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")), tmp_path)
    trainer.train_step()
    trainer.save()
    with torch.no_grad():
        next(iter(trainer.opt.param_groups[0]["params"])).view(-1)[0] = float("inf")
    trainer.step = 2
    with pytest.raises(UserError, match="parameters are not finite at step 2") as err:
        trainer.save()
    assert "train.resume_step=<step> (saved: 1; the latest may" in str(err.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    trainer.metrics.close()


def test_a_metrics_line_torn_by_a_kill_does_not_block_the_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code, err = _main(["train.steps=2", "train.ckpt_every=1", f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # the process died (or the disk filled) mid-write
    code, err = _main(["train.steps=3", f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (run / "metrics.rolled_back.jsonl").read_text() == '{"step": 3, "loss": 1.\n'
