"""perf.bench_collectives --only schedules: the schedules section at cluster scale (in-process;
structure and schedule shape only, no timed assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from collectives.algorithms import names
from perf import bench_collectives, bench_schedules


def test_schedules_section(tmp_path: Path) -> None:
    (tmp_path / "bench_collectives.json").write_text(json.dumps({"sweep": ["kept"]}))
    bench_collectives.main(["--quick", "--only", "schedules", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_collectives.json").read_text())
    assert res["sweep"] == ["kept"], "other sections are left as they were"
    rows = res["schedules"]
    assert [(r["E"], r["W"]) for r in rows] == [(E, W) for E in (64, 256) for W in (8, 64, 1024)]
    for r in rows:
        assert all(r[k] > 0 for k in r if k.endswith("_ms")), r
        assert r["picked"] in names()
        assert r["tree_rounds"] == math.ceil(math.log2(r["max_new_holders"] + 1)), r
        # Each rank draws PER_RANK experts; draws of an expert the rank owns add nothing.
        assert r["W"] * bench_schedules.PER_RANK - r["E"] <= r["extra_pairs"], r
        assert r["extra_pairs"] <= r["W"] * bench_schedules.PER_RANK, r
