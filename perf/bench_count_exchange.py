"""Share of a training step spent in the per-call count all-gather of the expert banks.

    python -m perf.bench_count_exchange [--out DIR] [--steps N]

Each bank call of ep/fssdp all-gathers the [W, E] count matrix (fssdp/counts.py) before the
token all-to-all; MoEUT calls each bank R times a step. This times the exchange in-process at
world 2 (gloo, one thread per rank): seconds inside `CountExchange.gather` and `.announce`
(issue and wait, which includes waiting for the slowest rank to arrive) over the step time, per
model and strategy, with the models' early announcements ([Note: announced routing]) off and
on. Writes `bench_count_exchange.json` (`announced_calls`: calls whose exchange was issued
early).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from tests.support.harness import run_distributed

CASES = [
    ("moeut_tiny", ["model=moeut_tiny"]),
    ("gpt_moe_bench", ["model=gpt_moe_bench", "train.seq_len=128"]),
]


def _job(rank: int, world: int, overrides: list[str], steps: int, announce: bool) -> tuple:
    from fssdp.counts import CountExchange
    from models.common.experts import ExpertBank
    from tests.support.parity import train_capture

    spent = [0.0, 0, 0]  # seconds in the count exchange, calls, calls announced early
    gather, early = CountExchange.gather, CountExchange.announce

    def timed(self: CountExchange, expert_N: Any) -> Any:
        t0 = time.perf_counter()
        announced = self._announced is not None
        out = gather(self, expert_N)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        spent[2] += announced
        return out

    def timed_announce(self: CountExchange, expert_N: Any) -> None:
        t0 = time.perf_counter()
        early(self, expert_N)
        spent[0] += time.perf_counter() - t0

    CountExchange.gather, CountExchange.announce = timed, timed_announce  # type: ignore[method-assign]
    if not announce:  # every call gathers its counts when it runs (the code before announcing)
        ExpertBank.announce = lambda self, expert_N: None  # type: ignore[method-assign]

    def probe(trainer: Any) -> tuple[float, float, int, int]:
        spent[:] = [0.0, 0, 0]
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return time.perf_counter() - t0, spent[0], spent[1], spent[2]

    extra = ["train.dtype=float32", "train.phase_timing=false", "train.global_batch_size=8"]
    return train_capture(rank, world, overrides + extra, 1, probe=probe)["probe"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_count_exchange")
    ap.add_argument("--out", type=Path, default=Path("perf/results"))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    rows = []
    for name, ov in CASES:
        for strategy, announce in itertools.product(("fssdp", "ep"), (False, True)):
            ov_s = [*ov, f"parallel={strategy}"]
            res = run_distributed(_job, 2, ov_s, args.steps, announce, timeout_s=900)
            step_s, count_s, calls, early = max(res, key=lambda r: r[1])
            rows.append({"model": name, "strategy": strategy, "announce": announce, "world": 2,
                         "steps": args.steps, "step_s": step_s, "count_exchange_s": count_s,
                         "calls": calls, "announced_calls": early,
                         "share": count_s / step_s})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_count_exchange.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
