"""`python -m launch.report`, the profiler window and tensorboard's load pictures, on one real
torchrun run; bad input to the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch import report
from launch.errors import UserError
from launch.train import compose_config
from tests.support.launch import read_metrics, torchrun
from tests.support.shared import shared

RUN = [
    "parallel=fssdp",
    "model.route_skew=1.0",
    "train.steps=4",
    "train.global_batch_size=4",
    "train.seq_len=32",
    "train.log_every=2",
    "train.profile_steps=[2,3]",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared(tmp_path_factory, "report-run", _train)  # read; the report adds its files


def _train(root: Path) -> Path:
    run = root / "run"
    p = torchrun(2, [*RUN, f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return run


def test_metrics_carry_phases_and_load(run_dir: Path) -> None:
    recs = read_metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 4]
    for r in recs:
        assert len(r["phase_spans"]) == 2
        assert {"forward", "backward", "expert", "dispatch", "spag"} <= set(r["phase_time_s"])
        assert set(r["expert_load"]) == set(r["replicas"])
        assert all(sum(c) == 4 * 32 * 2 for c in r["expert_load"].values())  # tokens × top-2
    # owners: logged at the first record, then only when re-sharding changes them
    assert "owners" in recs[0] and not any("owners" in r for r in recs[1:])
    assert all(set(o) <= {0, 1} for o in recs[0]["owners"].values())


def test_profiler_writes_one_chrome_trace_per_rank(run_dir: Path) -> None:
    for rank in range(2):
        events = json.loads((run_dir / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        steps = {e["name"] for e in events if str(e.get("name", "")).startswith("train_step")}
        assert steps == {"train_step 2", "train_step 3"}, steps


def test_tensorboard_has_load_histograms_and_heatmaps(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"expert_load_heatmap", "replicas_heatmap"} <= set(tags["images"])
    assert "expert_load/blocks.0.moe.experts" in tags["histograms"]
    assert "phase_time_s/expert/max" in tags["scalars"]
    hist = acc.Histograms("expert_load/blocks.0.moe.experts")[-1].histogram_value
    assert hist.num == 4 * 32 * 2 and len(hist.bucket) == 8
    assert hist.min == -0.5 and list(hist.bucket_limit) == [e + 0.5 for e in range(8)]  # ids


def test_report_of_a_real_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report.main([str(run_dir)])
    out = capsys.readouterr().out
    for text in ("where the time goes", "dispatch", "straggler ratio", "bytes per step", "memory"):
        assert text in out, text
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 9  # every figure: this run has every key
    assert len(list((run_dir / "report").glob("*.png"))) == 9








def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fssdp: error:")
    for bad in ("[3]", "[4,2]", "[0,1]", "[1,99]"):
        job, _ = compose_config(["train.steps=10", f"train.profile_steps={bad}"])
        with pytest.raises(UserError, match="train.profile_steps"):
            OmegaConf.to_object(job)
