"""perf.bench_planner --quick: the JSON's schema and its quality columns (no timing asserted).

Legend: W ranks, E experts, m = 2 extra slots per rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fssdp.assign import assign_tokens
from fssdp.planner import plan_exact
from perf import assign_v1, bench_planner, planner_v1
from perf.bench_planner_cases import SYNTHETIC, lower_bound

KEYS = {"world", "experts", "mode", "impl", "plan_ms", "assign_ms", "rows_max_over_mean",
        "lower_bound"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench")
    bench_planner.main(["--quick", "--out", str(out)])
    assert (out / "bench_planner.png").stat().st_size > 0
    return json.loads((out / "bench_planner.json").read_text())


def test_schema(rows: list[dict]) -> None:
    assert isinstance(rows, list) and rows
    for r in rows:
        assert KEYS <= set(r), r
        assert r["mode"] in ("exact", "predict", "calibrate") and r["impl"] in ("new", "v1")
        if r["plan_ms"] is None:
            assert r["impl"] == "v1" and r["skipped"]
        else:
            assert r["plan_ms"] > 0 and r["assign_ms"] > 0
    timing = [r for r in rows if r["case"] == "zipf1.0"]
    seen = {(r["world"], r["experts"], r["mode"], r["impl"]) for r in timing}
    modes = ("exact", "predict", "calibrate")
    impls = ("new", "v1")
    assert seen == {(W, 16, mode, impl) for W in (8, 16) for mode in modes for impl in impls}


def test_quality_columns(rows: list[dict]) -> None:
    for r in rows:
        if r["mode"] != "exact" or r["plan_ms"] is None:
            continue
        x = bench_planner.Inputs(r["case"], SYNTHETIC[r["case"]](r["world"], r["experts"], 0),
                                 SYNTHETIC[r["case"]](r["world"], r["experts"], 1))
        assert r["lower_bound"] == pytest.approx(lower_bound(x.counts, x.own.owner_E, 2))
        if r["impl"] == "new":
            p = plan_exact(x.counts, x.own, x.topo, 2)
            got = assign_tokens(x.counts, p, x.topo).rows_per_rank().tolist()
        else:
            c = x.counts.tolist()
            p = planner_v1.plan_exact(c, x.own, x.topo, 2)
            got = assign_v1.rows_per_rank(c, assign_v1.assign_tokens(c, p, x.topo))
        assert r["rows_max_over_mean"] == pytest.approx(max(got) / (sum(got) / len(got)))
        assert r["rows_max_over_mean"] >= r["lower_bound"] - 1e-9


def test_v1_budget_skips_and_says_why(tmp_path: Path) -> None:
    b = bench_planner.V1Budget(per_call_s=1.0)
    b.record("exact", 64, "zipf1.0", 8, {"plan_ms": 200.0, "assign_ms": 0.0, "repeats": 1})
    assert b.why_not("exact", 64, "zipf1.0", 8) is None
    assert "estimated 102 s per call at W=64" in (b.why_not("exact", 64, "zipf1.0", 64) or "")
    assert b.why_not("predict", 64, "zipf1.0", 64) is None, "budgets are per mode and case"
