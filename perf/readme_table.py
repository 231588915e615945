"""Markdown tables for the README's Performance section, from compare.json and simulate.json.

python -m perf.readme_table [--results perf/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from perf.compare_plot import SYSTEM_ORDER

RESULTS = Path(__file__).parent / "results"


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def compare_table(rep: dict[str, Any]) -> str:
    systems = [s for s in SYSTEM_ORDER if any(f"/{s}/" in k for k in rep["cases"])]
    lines = [
        "| model | world | routing | " + " | ".join(systems) + " | ep, balanced routing |",
        "|---|---|---|" + "---|" * (len(systems) + 1),
    ]
    s = rep["settings"]
    for model in s["models"]:
        for world in s["worlds"]:
            for routing in ("natural", "skewed"):
                cells = []
                for sys_ in systems:
                    c = rep["cases"].get(f"{model}/w{world}/{sys_}/{routing}") or {}
                    strag = c.get("straggler_ratio")
                    cell = _f(c.get("tokens_per_s"))
                    cells.append(cell + (f" ({strag:.2f})" if strag else ""))
                bal = rep["cases"].get(f"{model}/w{world}/ep/balanced") or {}
                lines.append(
                    f"| {model} | {world} | {routing} | "
                    + " | ".join(cells)
                    + f" | {_f(bal.get('tokens_per_s'))} |"
                )
    return "\n".join(lines)


def ratio_table(rep: dict[str, Any]) -> str:
    keys = (
        "fssdp_over_ep",
        "fssdp_over_deepspeed",
        "fssdp_over_fsdp",
        "fssdp_over_ddp",
        "fssdp_gated_over_ep",
        "fssdp_predict_over_ep",
    )
    lines = [
        "| model | world | routing | " + " | ".join(keys) + " | fssdp skewed / ep balanced step |",
        "|---|---|---|" + "---|" * (len(keys) + 1),
    ]
    for model, by_world in rep["ratios"].items():
        for world, r in by_world.items():
            for routing in ("skewed", "natural"):
                vals = " | ".join(_f(r[routing].get(k), "{:.2f}x") for k in keys)
                bal = r["fssdp_skewed_step_over_ep_balanced_step"] if routing == "skewed" else None
                lines.append(f"| {model} | {world} | {routing} | {vals} | {_f(bal, '{:.2f}x')} |")
    return "\n".join(lines)


def dense_s(case: dict[str, Any]) -> float | None:
    """The dense phases' time a step (`forward` + `backward`, each the median over steps of the
    slowest rank): the same work under every system of a model and world, so their spread
    across cases shows how the machine's speed moved between runs."""
    ph = case.get("phase_time_s") or {}
    if "forward" not in ph or "backward" not in ph:
        return None
    return ph["forward"]["max"] + ph["backward"]["max"]


def window_table(rep: dict[str, Any]) -> str:
    """Each case's measured window: steps, step time (median, 10th-90th centile), the repeats'
    spread, the expert-load imbalance it ran under (max/mean rows, median over steps), and its
    dense phases' time (`dense_s`)."""
    lines = [
        "| case | steps | step s (p10-p90) | repeat spread | load imbalance | dense fwd+bwd s |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in rep["cases"].items():
        if "step_time_s" not in c:
            lines.append(f"| {key} | {c.get('error', 'no figures')} | | | | |")
            continue
        lo, hi = c.get("step_time_p10_p90_s") or (None, None)
        spread = c.get("repeat_spread")
        lines.append(
            f"| {key} | {c['steps_measured']} | {c['step_time_s']:.3f} ({_f(lo, '{:.3f}')}-"
            f"{_f(hi, '{:.3f}')}) | {_f(spread, '{:.1%}')} | "
            f"{_f(c.get('expert_load_imbalance'), '{:.2f}')} | {_f(dense_s(c), '{:.3f}')} |"
        )
    return "\n".join(lines)


def hecate_table(sim: dict[str, Any]) -> str:
    """Predicted speedup over EP (planner time included, on the critical path)."""
    systems = ("fssdp", "fssdp_predict", "fssdp_lookahead", "fssdp_calibrate", "fastermoe", "fsdp")
    lines = [
        "| routing / cluster / model / GPUs | " + " | ".join(systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    for key, row in sorted(sim["hecate"].items()):
        sp = row["speedup_over_ep"]
        cells = [_f(sp.get(s), "{:.2f}x") for s in systems]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SCALING_SYSTEMS = ("fssdp", "fssdp_balance_only", "fssdp_predict", "fssdp_calibrate", "fastermoe",
                   "fastermoe_unbounded")  # fmt: skip


def scaling_table(sim: dict[str, Any]) -> str:
    """Weak scaling: speedup over EP at every simulated size, per expert count and routing."""
    rows = sim["scaling"]
    worlds = sorted({int(w) for r in rows.values() for w in r})
    lines = [
        "| experts / routing / cluster | system | " + " | ".join(map(str, worlds)) + " |",
        "|---|---|" + "---|" * len(worlds),
    ]
    for key in sorted(rows, key=lambda k: (int(k.rsplit("/e", 1)[-1]), k)):
        routing, kind, _, experts = key.split("/")
        by_w = rows[key]
        for s in SCALING_SYSTEMS:
            cells = [
                _f(by_w[str(w)]["ep"] / by_w[str(w)][s], "{:.2f}x")
                if str(w) in by_w and s in by_w[str(w)]
                else "-"
                for w in worlds
            ]
            head = f"| {experts[1:]} / {routing} / {kind} | {s} | "
            lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.readme_table")
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args()
    cmp_path, sim_path = a.results / "compare.json", a.results / "simulate.json"
    if cmp_path.exists():
        rep = json.loads(cmp_path.read_text())
        print(compare_table(rep), "\n")
        print(ratio_table(rep), "\n")
        print(window_table(rep), "\n")
    if sim_path.exists():
        sim = json.loads(sim_path.read_text())
        print(hecate_table(sim), "\n")
        print(scaling_table(sim))


if __name__ == "__main__":
    main()
