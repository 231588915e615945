"""Memory per rank of real training runs: peak RSS and model_state_bytes, by strategy and world.

    python -m perf.bench_memory [--baseline DIR] [--out DIR] [--steps N] [overrides...]

Runs `torchrun -m launch.train` (gloo, OMP_NUM_THREADS=1) for fssdp and ep at world 1, 2 and 4
on `gpt_moe_bench model.num_experts=64` (default overrides), reads `metrics.jsonl` and writes
`bench_memory.json`: per case the logged per-rank `model_state_bytes` and `peak_rss_bytes` of
the last step. `--baseline DIR` runs the same cases from another checkout (e.g. a git worktree
of an older commit) in the same session, side by side. World 1 runs the strategy at world 1
(not `parallel=none`), so the expert part's 1/W fall is visible within one strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT = [
    "model=gpt_moe_bench",
    "model.num_experts=64",
    "train.global_batch_size=4",
    "train.seq_len=128",
    "train.log_every=1",
    "train.val_every=0",
    "data.val_batches=0",
    "train.progress=false",
]
CASES = [(s, w) for s in ("fssdp", "ep") for w in (1, 2, 4)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(root: Path, strategy: str, world: int, steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_port()}",
            "-m", "launch.train", f"parallel={strategy}", f"train.steps={steps}",
            f"hydra.run.dir={run}", *overrides,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            return {"error": p.stderr[-2000:]}
        last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return {
        "model_state_bytes": last["model_state_bytes"],
        "peak_rss_bytes": last["peak_rss_bytes"],
        "step_time_s": last["step_time_s"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_memory")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to run too")
    ap.add_argument("--out", type=Path, default=Path("perf/results"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", default=None)
    args = ap.parse_args(argv)
    overrides = args.overrides or DEFAULT
    roots = {"current": Path(__file__).resolve().parent.parent}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()
    rows: list[dict[str, Any]] = []
    for strategy, world in CASES:
        for code, root in roots.items():
            got = run_case(root, strategy, world, args.steps, overrides)
            rows.append({"code": code, "strategy": strategy, "world": world, **got})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"overrides": overrides, "steps": args.steps, "rows": rows}
    (args.out / "bench_memory.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
