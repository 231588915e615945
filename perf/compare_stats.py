"""From metrics.jsonl records to the figures of compare.json: per-case medians and the ratios.

A run's figures use its steps after the warm-up; a case's figures pool the measured steps of all
its repeats (median), and keep each repeat's median step time to show the spread. Tokens/s is
tokens per step over the median step time (the slowest rank's time: everyone waits for it).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from perf.compare_cases import VARIANTS, Case


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _centiles(xs: list[float]) -> list[float]:
    """[10th, 90th] centiles (the one value twice when there is one step)."""
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return [q[0], q[-1]]


def measured(records: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """Training records of steps after the warm-up (validation-only lines are kept out)."""
    return [r for r in records if r.get("step", 0) > warmup and "step_time_s" in r]


def _phases(recs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per phase: median over steps of the mean and of the max over ranks (seconds)."""
    names = sorted({p for r in recs for p in r.get("phase_time_s") or {}})
    out = {}
    for p in names:
        rows = [r["phase_time_s"][p] for r in recs if p in (r.get("phase_time_s") or {})]
        out[p] = {
            "mean": statistics.median(sum(v) / len(v) for v in rows),
            "max": statistics.median(max(v) for v in rows),
        }
    return out


def summarize(runs: list[list[dict[str, Any]]], warmup: int, tokens: int) -> dict[str, Any]:
    """One case's figures from the records of each of its runs."""
    per_run = [measured(r, warmup) for r in runs]
    recs = [r for run in per_run for r in run]
    if not recs:
        raise ValueError("no measured steps: raise steps above the warm-up")
    times = [r["step_time_s"] for r in recs]
    step = statistics.median(times)
    repeats = [statistics.median(x["step_time_s"] for x in run) for run in per_run if run]
    comm_keys = sorted({k for r in recs for k in r.get("comm_bytes") or {}})
    last = recs[-1]
    return {
        "tokens_per_s": tokens / step,
        "step_time_s": step,
        "repeat_step_time_s": repeats,
        # the spread: repeats' medians apart over the median, and the steps' 10th/90th centiles
        "repeat_spread": (max(repeats) - min(repeats)) / step,
        "step_time_p10_p90_s": _centiles(times),
        "steps_measured": len(recs),
        "straggler_ratio": _median([r.get("straggler_ratio") for r in recs]),
        "rank_step_time_s": [
            statistics.median(r["rank_step_time_s"][i] for r in recs)
            for i in range(len(last["rank_step_time_s"]))
        ],
        "comm_bytes": {k: _median([r["comm_bytes"].get(k) for r in recs]) for k in comm_keys},
        "model_state_bytes": last.get("model_state_bytes"),
        "expert_load_imbalance": _median([r.get("expert_load_imbalance") for r in recs]),
        "phase_time_s": _phases(recs),
        "loss_last": last.get("loss"),
    }


def _tps(results: dict[str, dict[str, Any]], case: Case) -> float | None:
    r = results.get(case.key)
    return r.get("tokens_per_s") if r else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(results: dict[str, dict[str, Any]], model: str, world: int) -> dict[str, Any]:
    """fssdp's tokens/s over each other system, per routing, and skewed-vs-balanced step."""
    out: dict[str, Any] = {}
    for routing in ("skewed", "natural"):
        mine = _tps(results, Case(model, world, "fssdp", routing))
        out[routing] = {
            f"fssdp_over_{other}": _div(mine, _tps(results, Case(model, world, other, routing)))
            for other in ("ep", "deepspeed", "fsdp", "ddp")
        }
        ep = _tps(results, Case(model, world, "ep", routing))
        for variant in VARIANTS:
            out[routing][f"{variant}_over_ep"] = _div(
                _tps(results, Case(model, world, variant, routing)), ep
            )
    fs = results.get(Case(model, world, "fssdp", "skewed").key)
    bal = results.get(Case(model, world, "ep", "balanced").key)
    out["fssdp_skewed_step_over_ep_balanced_step"] = _div(
        fs and fs["step_time_s"], bal and bal["step_time_s"]
    )
    tu = results.get(Case(model, world, "fssdp_predict", "skewed").key)
    out["fssdp_predict_skewed_step_over_ep_balanced_step"] = _div(
        tu and tu.get("step_time_s"), bal and bal["step_time_s"]
    )
    out["straggler_ratio"] = {
        routing: {
            sys_: (results.get(Case(model, world, sys_, routing).key) or {}).get("straggler_ratio")
            for sys_ in ("fssdp", *VARIANTS, "ep", "fsdp", "ddp", "deepspeed")
        }
        for routing in ("skewed", "natural")
    }
    return out


def targets(all_ratios: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 21's targets per model: figure and whether it is met. Never slower than EP at any
    world or routing; at world 2 under skew, 1.3x EP and within 5% of EP's balanced step."""
    out = {}
    for model, by_world in all_ratios.items():
        every = {
            f"w{w}/{routing}": r[routing]["fssdp_over_ep"]
            for w, r in by_world.items()
            for routing in ("natural", "skewed")
        }
        known = [v for v in every.values() if v is not None]
        out[model] = {"fssdp_over_ep>=1.0_everywhere": [every, bool(known) and min(known) >= 1.0]}
        r = by_world.get("2")
        if r is None:
            continue
        sk = r["skewed"]
        strag = (results.get(Case(model, 2, "fssdp", "skewed").key) or {}).get("straggler_ratio")
        bal = r["fssdp_skewed_step_over_ep_balanced_step"]
        over_ep, over_ds = sk["fssdp_over_ep"], sk["fssdp_over_deepspeed"]
        out[model] |= {
            "fssdp_over_ep>=1.3": [over_ep, over_ep is not None and over_ep >= 1.3],
            "fssdp_over_deepspeed>fssdp_over_ep": [
                over_ds,
                None if over_ds is None else bool(over_ep and over_ds > over_ep),
            ],
            "fssdp_straggler<=1.1": [strag, strag is not None and strag <= 1.1],
            "skewed_step/ep_balanced_step<=1.05": [bal, bal is not None and bal <= 1.05],
        }
    return out
