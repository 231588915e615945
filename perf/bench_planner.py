"""The control plane's cost and quality: planning + assignment per bank per step, new vs v1.

    python -m perf.bench_planner [--out DIR] [--quick] [--v1-budget-s 10]

Writes DIR/bench_planner.json (default perf/results/): a list of rows with keys world, experts,
mode (exact, predict, calibrate), impl (new, v1), case (the input, perf/bench_planner_cases.py),
plan_ms, assign_ms (medians, in-process time.perf_counter, after a warm-up), rank_ms (what one
rank reads off the new Assignment: rows per rank, its send / receive counts, its received
experts), rows_max_over_mean (busiest rank's rows over the mean, from the assignment),
lower_bound ([Note: lower bound] in perf/bench_planner_cases.py), repeats, and `skipped` (why a
v1 row has no numbers). Timing rows use the case zipf1.0 at every world size; quality rows the
whole corpus in exact mode. v1 (perf/planner_v1.py, today's pure-Python code) is run only
where one call is expected to take under the budget (extrapolated from the last world size it
ran at, cost ~ W^3) and while its total stays under 6 minutes; skipped rows say so. Also
writes bench_planner.png (cost vs world size, log-log, new beside v1).

Legend: W ranks, E experts, R = 8 ranks per node (W itself below 8), m = 2 extra slots per
rank, t = E overlap degree (predict, calibrate: any expert may be replicated; the estimate is
the same case's next draw, same popularity, new noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from collectives.placement import Placement, Topology
from fssdp.assign import assign_tokens
from fssdp.planner import calibrate, plan_exact, plan_placement
from fssdp.sharding import contiguous_sharding
from perf import assign_v1, planner_v1
from perf.bench_planner_cases import SYNTHETIC, lower_bound, trace_counts, trace_loads

RESULTS = Path(__file__).parent / "results"
WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024)
EXPERTS = (64, 256)
M = 2
CAL = dict(expert_bytes=4 << 20, bandwidth_bytes_per_s=25e9, time_per_row_s=2e-7)
V1_TOTAL_S = 360.0


def _median_ms(f: Callable[[], Any], min_reps: int, min_s: float) -> tuple[float, int, Any]:
    out = f()  # warm-up (and the result)
    ts: list[float] = []
    t_end = time.perf_counter() + min_s
    while len(ts) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
        if len(ts) >= 200:
            break
    return statistics.median(ts) * 1e3, len(ts), out


class Inputs:
    """One benchmark input: counts (and a lagged estimate for predict / calibrate)."""

    def __init__(self, case: str, counts_WE: torch.Tensor, estimate_WE: torch.Tensor) -> None:
        W, E = counts_WE.shape
        self.case, self.W, self.E = case, W, E
        self.counts, self.load = counts_WE, estimate_WE.sum(0).to(torch.float64)
        self.topo = Topology(W, min(8, W))
        self.own = Placement.from_owners(contiguous_sharding(E, W), W)
        self.lb = lower_bound(counts_WE, self.own.owner_E, M)


def _imbalance(rows: list[int]) -> float:
    return max(rows) / (sum(rows) / len(rows)) if sum(rows) else 1.0


def run_new(x: Inputs, mode: str, fast: bool) -> dict[str, Any]:
    """plan + assign with fssdp.planner / fssdp.assign on tensors (as the runtime calls them)."""
    reps, secs = (3, 0.0) if fast else (7, 0.4)
    predicted = plan_placement(x.load, x.own, x.topo, x.E, M)
    plans: dict[str, Callable[[], Placement]] = {
        "exact": lambda: plan_exact(x.counts, x.own, x.topo, M),
        "predict": lambda: plan_placement(x.load, x.own, x.topo, x.E, M),
        "calibrate": lambda: calibrate(predicted, x.counts, x.topo, M, **CAL),
    }
    plan_ms, n_plan, p = _median_ms(plans[mode], reps, secs)
    assign_ms, n_assign, a = _median_ms(lambda: assign_tokens(x.counts, p, x.topo), reps, secs)

    def rank_view() -> None:
        a.rows_per_rank()
        a.send_counts(0)
        a.recv_counts(0)
        a.received_experts(0)

    rank_ms, _, _ = _median_ms(rank_view, reps, secs)
    rows = a.rows_per_rank().tolist()
    return dict(plan_ms=plan_ms, assign_ms=assign_ms, rank_ms=rank_ms,
                rows_max_over_mean=_imbalance(rows), repeats=min(n_plan, n_assign))


def run_v1(x: Inputs, mode: str) -> dict[str, Any]:
    """Today's implementation (perf/planner_v1.py, perf/assign_v1.py) on nested lists."""
    counts, load = x.counts.tolist(), x.load.tolist()
    predicted = planner_v1.plan_placement(load, x.own, x.topo, x.E, M)
    plans: dict[str, Callable[[], Placement]] = {
        "exact": lambda: planner_v1.plan_exact(counts, x.own, x.topo, M),
        "predict": lambda: planner_v1.plan_placement(load, x.own, x.topo, x.E, M),
        "calibrate": lambda: planner_v1.calibrate(predicted, counts, x.topo, M, **CAL),
    }
    t0 = time.perf_counter()
    p = plans[mode]()
    first = time.perf_counter() - t0
    reps = 1 if first > 1.0 else 3
    plan_ms, n, _ = _median_ms(plans[mode], reps, 0.0) if first <= 1.0 else (first * 1e3, 1, p)
    assign_ms, _, plan = _median_ms(lambda: assign_v1.assign_tokens(counts, p, x.topo), reps, 0.0)
    rows = assign_v1.rows_per_rank(counts, plan)
    return dict(plan_ms=plan_ms, assign_ms=assign_ms, rows_max_over_mean=_imbalance(rows),
                repeats=n)


class V1Budget:
    """Runs v1 only where one call should stay under `per_call_s` ([module docstring])."""

    def __init__(self, per_call_s: float, total_s: float = V1_TOTAL_S) -> None:
        self.per_call_s, self.total_s, self.spent = per_call_s, total_s, 0.0
        self.last: dict[tuple[str, int, str], tuple[int, float]] = {}  # -> (W, seconds)

    def why_not(self, mode: str, E: int, case: str, W: int) -> str | None:
        if self.spent > self.total_s:
            return f"v1 total time over {self.total_s:.0f} s"
        prev = self.last.get((mode, E, case))
        if prev is not None:
            est = prev[1] * (W / prev[0]) ** 3
            if est > self.per_call_s:
                lim = self.per_call_s
                return f"v1 {mode} estimated {est:.0f} s per call at W={W} > {lim:.0f} s"
        return None

    def record(self, mode: str, E: int, case: str, W: int, r: dict[str, Any]) -> None:
        s = (r["plan_ms"] + r["assign_ms"]) / 1e3
        self.spent += s * (1 + r["repeats"])
        self.last[(mode, E, case)] = (W, s)


def _inputs(case: str, W: int, E: int, traces: dict[str, tuple[list[int], list[int]]]) -> Inputs:
    if case in traces:
        last, prev = traces[case]
        return Inputs(case, trace_counts(last, W), trace_counts(prev, W))
    return Inputs(case, SYNTHETIC[case](W, E, 0), SYNTHETIC[case](W, E, 1))


def _row(x: Inputs, mode: str, impl: str, r: dict[str, Any]) -> dict[str, Any]:
    base = dict(world=x.W, experts=x.E, mode=mode, impl=impl, case=x.case, lower_bound=x.lb)
    return {**base, **r}


def bench(
    worlds: tuple[int, ...],
    experts: tuple[int, ...],
    cases: list[str],
    trace_dir: Path | None,
    v1_budget_s: float,
    fast: bool = False,
) -> list[dict[str, Any]]:
    """Timing rows (zipf1.0, every mode) and quality rows (the corpus, exact mode)."""
    traces = trace_loads(trace_dir) if trace_dir is not None else {}
    budget = V1Budget(v1_budget_s)
    rows: list[dict[str, Any]] = []
    jobs = [(E, c, mode) for E in experts for c in cases
            for mode in (("exact", "predict", "calibrate") if c == "zipf1.0" else ("exact",))]
    jobs += [(len(t[0]), name, "exact") for name, t in traces.items()]
    for W in worlds:
        for E, case, mode in jobs:
            x = _inputs(case, W, E, traces)
            rows.append(_row(x, mode, "new", run_new(x, mode, fast)))
            why = budget.why_not(mode, E, case, W)
            if why is None:
                r = run_v1(x, mode)
                budget.record(mode, E, case, W, r)
                rows.append(_row(x, mode, "v1", r))
            else:
                rows.append(_row(x, mode, "v1", dict(
                    plan_ms=None, assign_ms=None, rows_max_over_mean=None, skipped=why)))
        print(f"W={W} done ({len(rows)} rows, v1 {budget.spent:.0f} s)", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["experts"] for r in rows if r["case"] == "zipf1.0"})
    fig, axes = plt.subplots(1, len(experts), figsize=(6 * len(experts), 4.5), squeeze=False)
    for ax, E in zip(axes[0], experts):
        for mode, color in (("exact", "C0"), ("predict", "C1"), ("calibrate", "C2")):
            for impl, style in (("new", "-o"), ("v1", "--x")):
                pts = sorted((r["world"], r["plan_ms"] + r["assign_ms"]) for r in rows
                             if r["experts"] == E and r["case"] == "zipf1.0" and r["mode"] == mode
                             and r["impl"] == impl and r["plan_ms"] is not None)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{mode} {impl}")
        ax.set(xscale="log", yscale="log", xlabel="world size W", ylabel="plan + assign (ms)",
               title=f"E = {E}, zipf 1.0, one bank step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_planner", description=__doc__)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="W 8 and 16, E 16, three cases")
    ap.add_argument("--v1-budget-s", type=float, default=10.0)
    ap.add_argument("--traces", type=Path, default=Path(__file__).parent / "results" / "traces")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if a.quick:
        rows = bench((8, 16), (16,), ["zipf1.0", "one_expert", "many_empty"], None,
                     a.v1_budget_s, fast=True)
    else:
        rows = bench(WORLDS, EXPERTS, list(SYNTHETIC), a.traces, a.v1_budget_s)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_planner.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, a.out / "bench_planner.png")
    print(f"wrote {a.out / 'bench_planner.json'} and bench_planner.png "
          f"({len(rows)} rows) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
