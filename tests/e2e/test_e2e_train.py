"""End to end under torchrun: the run directory and resume (bad input: e2e/test_bad_input.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.launch import read_metrics, torchrun
from tests.support.shared import shared

SMALL = [
    "train.steps=6",
    "train.global_batch_size=4",
    "train.seq_len=32",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.keep_last=0",
]
REQUIRED_KEYS = {
    "step",
    "loss",
    "aux_loss",
    "tokens_per_s",
    "step_time_s",
    "rank_step_time_s",
    "rank_expert_time_s",
    "straggler_ratio",
    "expert_load_imbalance",
    "comm_bytes",
    "model_state_bytes",
    "peak_rss_bytes",
}


def _train(where: Path) -> Path:
    run = where / "run"
    p = torchrun(2, [*SMALL, f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "open tensorboard" in p.stdout and str(run) in p.stdout
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared(tmp_path_factory, "e2e-train-run", _train)  # read or copied, never changed


def test_run_directory_contents(run_dir: Path) -> None:
    assert (run_dir / "config.yaml").read_text().count("gpt_moe") >= 1
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert REQUIRED_KEYS <= r.keys()
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["expert_load_imbalance"] >= 1
        assert len(r["rank_step_time_s"]) == 2 and len(r["peak_rss_bytes"]) == 2
        assert min(r["peak_rss_bytes"]) > 50e6
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "val_bpb" in rows[-1]


@pytest.mark.slow
def test_resume_continues_the_same_trajectory(run_dir: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if killed after step 3
    p = torchrun(2, [*SMALL, f"hydra.run.dir={resumed}", "train.resume=true"])
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from step 3" in p.stdout
    full = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        assert again[s] == pytest.approx(full[s], rel=1e-6, abs=0), (s, again[s], full[s])
    assert (resumed / "metrics.rolled_back.jsonl").exists()


# Bad input (one line, exit code 2, nothing saved touched): tests/e2e/test_bad_input.py.
