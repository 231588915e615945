"""perf.profile_breakdown: self times of nested ops, categories, per step; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perf.profile_breakdown import breakdown, category, main


def _op(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def _write(run: Path, events: list[dict]) -> None:
    (run / "profile").mkdir(parents=True)
    (run / "profile" / "rank0.json").write_text(json.dumps({"traceEvents": events}))


def test_self_time_categories_and_steps(tmp_path: Path) -> None:
    us = 1e6  # one second in trace units
    events = [
        _op("train_step 2", 0, 10 * us, cat="user_annotation"),
        _op("train_step 3", 10 * us, 10 * us, cat="user_annotation"),
        _op("aten::linear", 1 * us, 4 * us),  # holds an addmm of 3 s: 1 s self
        _op("aten::addmm", 1.5 * us, 3 * us),
        _op("gloo:all_to_all", 12 * us, 2 * us, tid=2),  # another thread: counted on its own
        _op("Optimizer.step#AdamW.step", 15 * us, 4 * us),
        _op("aten::addcdiv_", 16 * us, 1 * us),
        _op("aten::mm", 30 * us, 5 * us),  # outside the profiled steps: left out
    ]
    _write(tmp_path, events)
    r = breakdown(tmp_path)["rank0"]
    assert r["steps"] == 2 and r["step_s"] == pytest.approx(10.0)
    per_step = {k: v * 2 for k, v in r["top_ops_s"].items()}  # totals over the two steps
    assert per_step["aten::linear"] == pytest.approx(1.0)
    assert per_step["aten::addmm"] == pytest.approx(3.0)
    assert per_step["Optimizer.step#AdamW.step"] == pytest.approx(3.0)
    assert "aten::mm" not in per_step
    cats = {k: v * 2 for k, v in r["category_s"].items()}
    assert cats["matmul"] == pytest.approx(4.0)
    assert cats["optimizer"] == pytest.approx(4.0)
    assert cats["communication"] == pytest.approx(2.0)


def test_category_first_match() -> None:
    assert category("aten::addmm") == "matmul"
    assert category("gloo:all_reduce") == "communication"
    assert category("aten::index_add_") == "index / scatter"
    assert category("aten::gelu") == "elementwise"
    assert category("something_new") == "other"


def test_missing_profile_is_one_line_exit_2(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.profile_steps" in err[0]
