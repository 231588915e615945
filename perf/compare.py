"""FSSDP against EP, DeepSpeed-MoE, FSDP2 and DDP, side by side, with the real trainer.

    python -m perf.compare [--quick] [--models gpt_moe_bench] [--worlds 2 4] [--repeats 2]

Every case (model × world × system × routing, plus EP under perfectly balanced routing) is a
`torchrun … -m launch.train` run (DeepSpeed: `-m perf.deepspeed_moe`) with `train.log_every=1`,
`OMP_NUM_THREADS=1` per rank, gloo; its metrics.jsonl is read and the warm-up steps dropped.
Runs are interleaved (every case once per repeat, the order reversed on odd repeats) so that load
from other processes on the machine hits all systems alike. Writes perf/results/compare.json
(medians, ratios, targets), perf/results/compare.png, and the routing traces of the runs
(perf/results/traces/, input of `python -m perf.simulate`). The settings: [Note: a benchmark
that resembles training] in perf/compare_cases.py. `--quick`: gpt_moe_bench at world 2, one
repeat of 6 short steps (under 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from perf.compare_cases import FULL, QUICK, SYSTEMS, Case, Settings, cases, command
from perf.compare_stats import ratios, summarize, targets
from perf.deepspeed_setup import PIN, ensure

RESULTS = Path(__file__).parent / "results"


class CaseFailed(RuntimeError):
    pass


def run_once(case: Case, s: Settings, run_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """One torchrun run of `case`; its metrics records. The run's routing trace is kept."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            command(case, s, run_dir), env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        raise CaseFailed(f"timed out after {timeout_s:.0f} s") from e
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "Error" in ln]
        raise CaseFailed(f"exit {proc.returncode}: {(lines or ['no error line'])[-1][:300]}")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _keep_trace(case: Case, run_dir: Path, traces: Path) -> None:
    src = run_dir / "routing_trace.jsonl"
    dst = traces / f"{case.model}_{case.routing}.jsonl"
    if src.exists() and not dst.exists():
        traces.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def run_all(s: Settings, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Every case `s.repeats` times, interleaved; per-case records (or the failure)."""
    todo = cases(s)
    records: dict[str, list[list[dict[str, Any]]]] = {c.key: [] for c in todo}
    failed: dict[str, str] = {}
    traces = out_dir / "traces"
    for case in todo:  # an earlier run's traces would not match this one's settings
        (traces / f"{case.model}_{case.routing}.jsonl").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="fssdp-compare-") as tmp:
        for rep in range(s.repeats):
            for case in todo if rep % 2 == 0 else todo[::-1]:
                if case.key in failed:
                    continue
                run_dir = Path(tmp) / f"{case.key.replace('/', '_')}_{rep}"
                t0 = time.perf_counter()
                try:
                    recs = run_once(case, s, run_dir, timeout_s)
                except CaseFailed as e:
                    failed[case.key] = str(e)
                    print(f"[{rep}] {case.key}: FAILED {e}", flush=True)
                    continue
                records[case.key].append(recs)
                _keep_trace(case, run_dir, traces)
                shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are large
                last = recs[-1]
                print(
                    f"[{rep}] {case.key}: {last.get('tokens_per_s', 0):.0f} tok/s last step, "
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
    return {"records": records, "failed": failed}


def build_report(s: Settings, raw: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    for case in cases(s):
        entry: dict[str, Any] = {
            "model": case.model,
            "world": case.world,
            "system": case.system,
            "routing": case.routing,
        }
        runs = raw["records"].get(case.key) or []
        if case.key in raw["failed"] and not runs:
            entry["error"] = raw["failed"][case.key]
        else:
            try:
                entry.update(summarize(runs, s.warmup, s.tokens(case.world)))
            except ValueError as e:
                entry["error"] = str(e)
        results[case.key] = entry
    all_ratios = {m: {str(w): ratios(results, m, w) for w in s.worlds} for m in s.models}
    return {
        "command": " ".join(["python -m perf.compare", *argv]),
        "settings": s.as_dict(),
        "machine": _machine(),
        "cases": results,
        "ratios": all_ratios,
        "targets": targets(all_ratios, results),
    }


def _machine() -> dict[str, Any]:
    import torch

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 - report why the baseline is missing, keep the rest
        ds = f"unavailable: {type(e).__name__}: {e}"
    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "deepspeed": ds,
        "load_avg": list(os.getloadavg()),
    }


def parse(argv: list[str]) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m perf.compare", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="gpt_moe_bench, world 2, one repeat")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--worlds", nargs="+", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, help="a subset of the systems")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, help="first steps of each run left out")
    ap.add_argument("--skew", type=float, help="model.route_skew of the skewed cases")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ds = ap.add_mutually_exclusive_group()
    ds.add_argument(
        "--install-deepspeed", action="store_true", help=f"pip install {PIN} if missing"
    )
    ds.add_argument("--no-deepspeed", action="store_true", help="leave the DeepSpeed cases out")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    if a.no_deepspeed:
        s = replace(s, deepspeed=False)
    for name, val in (("models", a.models), ("worlds", a.worlds), ("systems", a.systems)):
        if val:
            s = replace(s, **{name: tuple(val)})
    for name in ("repeats", "steps", "warmup", "skew"):
        if getattr(a, name) is not None:
            s = replace(s, **{name: getattr(a, name)})
    if s.steps <= s.warmup or s.repeats < 1:
        ap.error(f"need steps > warm-up ({s.warmup}) and repeats >= 1")
    return s, a


def main(argv: list[str] | None = None) -> None:
    import sys

    from perf.compare_plot import plot

    argv = list(sys.argv[1:] if argv is None else argv)
    s, a = parse(argv)
    # one line and exit 2 when DeepSpeed is wanted and missing
    ensure(s.deepspeed and "deepspeed" in s.systems, a.install_deepspeed)
    t0 = time.perf_counter()
    raw = run_all(s, a.out, a.timeout)
    report = build_report(s, raw, argv)
    report["wall_s"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, a.out / "compare.png")
    print(json.dumps({"ratios": report["ratios"], "targets": report["targets"]}, indent=1))
    print(f"wrote {a.out / 'compare.json'} and compare.png in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
