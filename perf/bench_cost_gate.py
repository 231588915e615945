"""Exact mode with and without its cost gate ([Note: when replication pays] in fssdp/policy.py),
side by side with EP, in one interleaved run of the real trainer.

    python -m perf.bench_cost_gate [--models gpt_moe_bench moeut_tiny] [--worlds 2]
        [--steps 12] [--warmup 3] [--repeats 2] [--out DIR]

Per (model, world, routing): `ep`, `fssdp` (`parallel.cost_aware=true`) and `fssdp_always`
(`parallel.cost_aware=false`: the balancing plan every step). Runs as `perf.compare` runs them
(torchrun, gloo, OMP_NUM_THREADS=1 per rank, metrics.jsonl after the warm-up; repeats
interleaved, order reversed on odd repeats). Writes DIR/bench_cost_gate.json: per case the
median step time, each repeat's median (the spread), the expert-load imbalance (max/mean), the
spAG bytes and the replicas per step; and fssdp/EP, fssdp_always/EP per routing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from perf.compare import CaseFailed, run_once
from perf.compare_cases import Case, Settings
from perf.compare_stats import measured, summarize

RESULTS = Path(__file__).parent / "results"
SYSTEMS = {
    "ep": (),
    "fssdp": ("parallel.cost_aware=true",),
    "fssdp_always": ("parallel.cost_aware=false",),
}


def _run(case: Case, s: Settings, tmp: Path, rep: int) -> list[dict[str, Any]]:
    system = "fssdp" if case.system == "fssdp_always" else case.system
    s_case = replace(s, extra=(*s.extra, *SYSTEMS[case.system]))
    run_dir = tmp / f"{case.key.replace('/', '_')}_{rep}"
    return run_once(replace(case, system=system), s_case, run_dir, 900.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_cost_gate")
    ap.add_argument("--models", nargs="+", default=["gpt_moe_bench", "moeut_tiny"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    s = Settings(tuple(args.models), tuple(args.worlds), args.steps, args.warmup,
                 args.repeats, 4, 256, 1.0)  # fmt: skip
    todo = [Case(m, w, sys_, r) for m in s.models for w in s.worlds
            for r in ("natural", "skewed") for sys_ in SYSTEMS]  # fmt: skip
    runs: dict[str, list[list[dict[str, Any]]]] = {c.key: [] for c in todo}
    with tempfile.TemporaryDirectory(prefix="fssdp-gate-") as tmp:
        for rep in range(s.repeats):
            for case in todo if rep % 2 == 0 else todo[::-1]:
                try:
                    runs[case.key].append(_run(case, s, Path(tmp), rep))
                except CaseFailed as e:
                    print(f"{case.key}: FAILED {e}", flush=True)
                print(f"[{rep}] {case.key}", flush=True)
    cases: dict[str, Any] = {}
    for case in todo:
        if not runs[case.key]:
            continue
        fig = summarize(runs[case.key], s.warmup, s.tokens(case.world))
        recs = [r for run in runs[case.key] for r in measured(run, s.warmup)]
        reps = [sum(sum(v) for v in (r.get("replicas") or {}).values()) for r in recs]
        fig["replicas_per_step"] = statistics.median(reps) if reps else 0
        cases[case.key] = {k: fig[k] for k in ("step_time_s", "repeat_step_time_s",
                           "expert_load_imbalance", "comm_bytes", "steps_measured",
                           "replicas_per_step")}  # fmt: skip
    ratio = {}
    for m in s.models:
        for w in s.worlds:
            for r in ("natural", "skewed"):
                ep = cases.get(Case(m, w, "ep", r).key, {}).get("step_time_s")
                for sys_ in ("fssdp", "fssdp_always"):
                    t = cases.get(Case(m, w, sys_, r).key, {}).get("step_time_s")
                    if ep and t:
                        ratio[f"{m}/w{w}/{r}/{sys_}_over_ep"] = ep / t
    out = {"command": "python -m perf.bench_cost_gate", "settings": s.as_dict(),
           "cases": cases, "speed_over_ep": ratio}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cost_gate.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(ratio, indent=1))


if __name__ == "__main__":
    main()
