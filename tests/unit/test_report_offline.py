"""`python -m launch.report` on an older run's metrics (without the newer keys), and the phase
means skipping the warm-up step; no training run needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launch import report
from launch.report_figures import mean_phase_times

OLD_RECORD = {  # the keys logged before phases and per-expert load were logged
    "loss": 5.0,
    "aux_loss": 0.01,
    "tokens_per_s": 1000.0,
    "step_time_s": 0.5,
    "rank_step_time_s": [0.5, 0.4],
    "rank_expert_time_s": [0.2, 0.1],
    "straggler_ratio": 1.33,
    "expert_load_imbalance": 2.0,
    "comm_bytes": {"spag": 0, "sprs": 0, "a2a": 1000, "dense": 5000},
    "model_state_bytes": [100.0, 100.0],
    "peak_rss_bytes": [1000, 1100],
}


def test_report_of_an_older_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps({"step": s, **OLD_RECORD}) for s in (1, 10, 20)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3')  # torn last line
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "no phase_time_s" in out and "straggler ratio" in out and "a2a" in out
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # loss, straggler, communication, memory
    assert "no phase_spans" in page and "no expert_load" in page


def test_phase_means_skip_the_warm_up_step() -> None:
    recs: list[dict[str, Any]] = [
        {"step": 1, "phase_time_s": {"expert": [9.0, 9.0]}},
        {"step": 5, "phase_time_s": {"expert": [1.0, 3.0], "forward": [2.0, 2.0]}},
        {"step": 10, "phase_time_s": {"expert": [3.0, 5.0]}},
    ]
    assert mean_phase_times(recs) == {"forward": [1.0, 1.0], "expert": [2.0, 4.0]}


