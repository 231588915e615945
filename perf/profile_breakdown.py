"""Where a profiled step's time goes: self time per op and per category, from chrome traces.

    python -m perf.profile_breakdown RUN_DIR [RUN_DIR …] [--out FILE]

Reads `RUN_DIR/profile/rank{r}.json` (written by `train.profile_steps=[a,b]`, by `launch.train`
and by `perf.deepspeed_moe` alike), takes the CPU ops (`cat` cpu_op) inside the `train_step N`
ranges, and charges each op its self time (its duration less its children's on the same
thread). Categories by op name (CATEGORIES, first match wins; the rest is "other"), summed per
rank and averaged over the profiled steps. Prints one table per run and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# (category, pattern over the op name): the order matters, the first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("communication", r"gloo|all_to_all|alltoall|all_reduce|allreduce|all_gather|allgather|"
     r"reduce_scatter|broadcast|barrier|record_param_comms|c10d|wait"),
    ("optimizer", r"Optimizer|adam|_foreach|lerp|addcdiv|addcmul|clip_grad|_fused"),
    ("matmul", r"aten::(mm|addmm|bmm|baddbmm|matmul|linear|einsum|_grouped_mm)$"),
    ("index / scatter", r"index|scatter|gather|cumsum|nonzero|bincount|argsort|sort|topk|"
     r"one_hot|masked|repeat_interleave|take"),
    ("copy / alloc", r"copy_|to$|_to_copy|clone|empty|zeros|zero_|fill_|cat|stack|contiguous|"
     r"resize|view|reshape|narrow|slice|select|as_strided|split|chunk"),
    ("elementwise", r"aten::(add|sub|mul|div|gelu|relu|silu|sigmoid|softmax|_softmax|exp|log|"
     r"neg|pow|sum|mean|max|min|where|layer_norm|native_layer_norm|sqrt|rsqrt|tanh|"
     r"_log_softmax|nll_loss|cross_entropy)"),
)
_COMPILED = [(name, re.compile(p, re.IGNORECASE)) for name, p in CATEGORIES]


def category(op: str) -> str:
    for name, pat in _COMPILED:
        if pat.search(op):
            return name
    return "other"


def _self_times(events: list[dict[str, Any]]) -> dict[str, float]:
    """Self time (µs) per op name of complete events on one thread (nested by time)."""
    out: dict[str, float] = defaultdict(float)
    stack: list[list[Any]] = []  # [end, name, child time]
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1][0] <= e["ts"]:
            end, name, child = stack.pop()
            out[name] -= child
        if stack:
            stack[-1][2] += e["dur"]
        out[e["name"]] += e["dur"]
        stack.append([e["ts"] + e["dur"], e["name"], 0.0])
    while stack:
        _, name, child = stack.pop()
        out[name] -= child
    return out


def rank_breakdown(trace: Path) -> dict[str, Any]:
    """One rank's self time per op and per category, per profiled step (seconds)."""
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if str(e.get("name", "")).startswith("train_step")]
    if not steps:
        raise ValueError(f"{trace}: no train_step ranges (was train.profile_steps set?)")
    lo = min(e["ts"] for e in steps)
    hi = max(e["ts"] + e["dur"] for e in steps)
    ops = [
        e for e in events
        if e.get("ph") == "X" and e.get("cat") == "cpu_op" and lo <= e["ts"] <= hi
    ]  # fmt: skip
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    per_op: dict[str, float] = defaultdict(float)
    for evs in by_thread.values():
        for name, us in _self_times(evs).items():
            per_op[name] += us
    n = len(steps)
    cats: dict[str, float] = defaultdict(float)
    for name, us in per_op.items():
        cats[category(name)] += us / 1e6 / n
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {
        "steps": n,
        "step_s": sum(e["dur"] for e in steps) / 1e6 / n,
        "category_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_ops_s": {k: v / 1e6 / n for k, v in top},
    }


def breakdown(run_dir: Path) -> dict[str, Any]:
    traces = sorted((run_dir / "profile").glob("rank*.json"))
    if not traces:
        raise ValueError(f"{run_dir}: no profile/rank*.json (run with train.profile_steps=[a,b])")
    return {t.stem: rank_breakdown(t) for t in traces}


def _table(name: str, ranks: dict[str, Any]) -> str:
    cats = sorted({c for r in ranks.values() for c in r["category_s"]})
    head = f"{name}: seconds per step (self time of CPU ops), per rank"
    rows = [f"  {'':16}" + "".join(f"{r:>10}" for r in ranks)]
    rows.append(f"  {'step':16}" + "".join(f"{r['step_s']:10.3f}" for r in ranks.values()))
    for c in cats:
        vals = "".join(f"{r['category_s'].get(c, 0.0):10.3f}" for r in ranks.values())
        rows.append(f"  {c:16}{vals}")
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.profile_breakdown", description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    out = {}
    for run in a.runs:
        try:
            out[str(run)] = breakdown(run)
        except ValueError as e:  # bad input: one line, exit 2
            print(f"perf.profile_breakdown: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(_table(run.name, out[str(run)]))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
