"""Share of a training step spent in the per-call count all-gather of the expert banks.

    python -m perf.bench_count_exchange [--out DIR] [--steps N]

Each bank call of ep/fssdp all-gathers the [W, E] count matrix (fssdp/ep.py, fssdp/executor.py)
before the token all-to-all; MoEUT calls each bank R times a step. This times those calls
in-process at world 2 (gloo, one thread per rank): seconds inside `all_gather_counts` (which
includes waiting for the slowest rank to arrive) over the step time, per model and strategy.
Writes `bench_count_exchange.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tests.support.harness import run_distributed

CASES = [
    ("moeut_tiny", ["model=moeut_tiny"]),
    ("gpt_moe_bench", ["model=gpt_moe_bench", "train.seq_len=128"]),
]


def _job(rank: int, world: int, overrides: list[str], steps: int) -> tuple[float, float, int]:
    import fssdp.ep as fe
    import fssdp.executor as fx
    from tests.support.parity import train_capture

    spent = [0.0, 0]
    orig = fx.all_gather_counts

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = orig(*a, **k)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return out

    fx.all_gather_counts = fe.all_gather_counts = timed

    def probe(trainer: Any) -> tuple[float, float, int]:
        spent[0], spent[1] = 0.0, 0
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return time.perf_counter() - t0, spent[0], spent[1]

    extra = ["train.dtype=float32", "train.phase_timing=false", "train.global_batch_size=8"]
    return train_capture(rank, world, overrides + extra, 1, probe=probe)["probe"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_count_exchange")
    ap.add_argument("--out", type=Path, default=Path("perf/results"))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    rows = []
    for name, ov in CASES:
        for strategy in ("fssdp", "ep"):
            res = run_distributed(_job, 2, [*ov, f"parallel={strategy}"], args.steps, timeout_s=900)
            step_s, count_s, calls = max(res, key=lambda r: r[1])
            rows.append({"model": name, "strategy": strategy, "world": 2, "steps": args.steps,
                         "step_s": step_s, "count_exchange_s": count_s, "calls": calls,
                         "share": count_s / step_s})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_count_exchange.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
