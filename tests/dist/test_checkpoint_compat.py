"""Checkpoints written by earlier versions keep loading: a committed fixture (tests/fixtures/
ckpt_v1_fssdp_w2, float64 gpt_moe, saved at step 2 by a world-2 fssdp run whose experts lived in
the old ExpertStore) resumes under fssdp, ep and none at worlds 2 and 1 and continues along the
losses that run logged for steps 3 and 4."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from launch.build import build_trainer
from launch.consolidate import load_run_config
from launch.dist import DistInfo
from tests.support.harness import run_distributed

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "ckpt_v1_fssdp_w2"
TOL = 1e-9  # float64; other reduction orders than the run that wrote it
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _continue(rank: int, world: int, strategy: str, run_dir: str) -> list[float]:
    cfg = load_run_config(FIXTURE)
    cfg.parallel = replace(cfg.parallel, strategy=strategy)
    cfg.train.progress = False
    info = DistInfo(rank, world, rank, world, torch.device("cpu"))
    trainer = build_trainer(cfg, info, Path(run_dir))
    step = trainer.resume(path=Path(run_dir) / "checkpoints" / "step_00000002")
    assert step == 2
    losses = [trainer.train_step()["loss"] for _ in range(cfg.train.steps - step)]
    if dist.is_initialized():
        dist.barrier()
    return losses


def _session(rank: int, world: int, jobs: list[tuple[str, str]]) -> dict[str, list[float]]:
    return {strategy: _continue(rank, world, strategy, run) for strategy, run in jobs}


def _copy(tmp_path: Path, name: str) -> str:
    run = tmp_path / name
    shutil.copytree(FIXTURE, run)
    return str(run)


def test_old_checkpoint_resumes_on_the_logged_trajectory(tmp_path: Path) -> None:
    want = json.loads((FIXTURE / "expected.json").read_text())["losses_after"]
    want = [want[k] for k in sorted(want, key=int)]
    jobs = [(s, _copy(tmp_path, f"{s}2")) for s in ("fssdp", "ep")]
    got: dict[str, Any] = {f"{s}2": v for s, v in run_distributed(_session, 2, jobs)[0].items()}
    got["none1"] = run_distributed(_session, 1, [("none", _copy(tmp_path, "none1"))])[0]["none"]
    for name, losses in got.items():
        assert len(losses) == len(want), (name, losses)
        for s, (a, b) in enumerate(zip(losses, want), start=3):
            assert abs(a - b) <= TOL * abs(b), f"{name}: step {s}: {a!r} vs {b!r}"
