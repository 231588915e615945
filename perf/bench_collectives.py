"""Benchmark: sparse collectives (spAG / spRS, each algorithm) vs dense all-gather / reduce-scatter.

    python -m perf.bench_collectives [--quick] [--only collectives|schedules]

Legend: E experts, S elements per expert (float32), W ranks (gloo on CPU, one thread each),
lam = fraction of the E*(W-1) non-owner (expert, rank) pairs that get a replica (lam = 1: every
rank holds every expert, the dense all-gather's result). A time is the median over repeats of
the slowest rank's wall time, after warm-up; the variants of one point are timed interleaved so
that load from other processes hits them alike. Bytes are payload bytes received, summed over
ranks (for the dense ops: what each rank lacks). Writes perf/results/bench_collectives.{json,png}.

Sections: "sweep" and "hot" (the collectives), "runtime" inside each sweep point (one step's
spAG and spRS as the runtime ran them before the new modes: pack every owned row, gather all held
rows, pick the replicas; zero-filled [T, S] gradients, reduce, add into .grad; against spAG
new_only from a row source into the replica buffer and spRS replicas_only accumulated into
.grad), "calibration", "rule", and "schedules" (perf/bench_schedules.py, in-process, W up to
1024). `--only schedules` refreshes that section alone in an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives import (
    DEFAULT_COST,
    CostModel,
    Placement,
    algorithm_costs,
    choose_algorithm,
    probe_cost_model,
    sparse_all_gather,
    sparse_reduce_scatter,
)
from perf import bench_schedules

RESULTS = Path(__file__).parent / "results"
LAMBDAS = (0.05, 0.1, 0.25, 0.5, 1.0)
E = 16
S = 256 * 1024  # 1 MiB per expert in float32


def timed(fns: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, float]:
    """Median (over interleaved repeats) of the slowest rank's time of each function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    dts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dts[k].append(time.perf_counter() - t0)
    t = torch.tensor(list(dts.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {k: statistics.median(row) for k, row in zip(dts, t.tolist())}


def total(n: int) -> int:
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def sparse_fns(rank: int, p0: Placement, p1: Placement, s: int) -> dict[str, Any]:
    """Closures for spAG(p0 -> p1) and spRS(p1 -> p0) with each algorithm, writing into
    preallocated outputs (as the runtime's persistent buffers would)."""
    x_OS, g_HS = torch.randn(len(p0.owned(rank)), s), torch.randn(len(p1.held(rank)), s)
    held, owned = torch.empty(len(p1.held(rank)), s), torch.empty(len(p0.owned(rank)), s)
    fns: dict[str, Any] = {}
    for algo in ("a2a", "tree"):
        fns[f"spag_{algo}"] = lambda a=algo: sparse_all_gather(x_OS, p0, p1, algorithm=a, out=held)
        fns[f"sprs_{algo}"] = lambda a=algo: sparse_reduce_scatter(
            g_HS, p1, p0, algorithm=a, out=owned
        )
    return fns


def modelled(p0: Placement, p1: Placement, row: int, cm: CostModel) -> dict[str, Any]:
    """Modelled cost of each algorithm and the rule's pick (what algorithm="auto" runs)."""
    c: dict[str, Any] = dict(algorithm_costs(p0, p1, expert_bytes=row, cost_model=cm))
    c["pick"] = choose_algorithm(p0, p1, expert_bytes=row, cost_model=cm)
    return c


def runtime_fns(rank: int, p0: Placement, p1: Placement, s: int) -> dict[str, Any]:
    """One step's spAG and spRS of the replicas, the old way and with the new modes (module
    docstring), each algorithm. R replicas, O owned rows, T = O + R held rows."""
    owned, held = p0.owned(rank), p1.held(rank)
    mine = set(owned)
    rep_pos = torch.tensor([i for i, e in enumerate(held) if e not in mine], dtype=torch.long)
    params_OS, grad_OS = torch.randn(len(owned), s), torch.zeros(len(owned), s)
    rep_RS, rgrad_RS = torch.empty(len(rep_pos), s), torch.randn(len(rep_pos), s)
    row_of = {e: i for i, e in enumerate(owned)}

    def source(ids: list[int]) -> torch.Tensor:  # packs only the rows this rank sends
        return params_OS.index_select(0, torch.tensor([row_of[e] for e in ids]))

    def spag_old(a: str) -> Any:
        held_TS, st = sparse_all_gather(params_OS.clone(), p0, p1, algorithm=a)
        return held_TS.index_select(0, rep_pos), st

    def sprs_old(a: str) -> Any:
        full_TS = torch.zeros(len(held), s)
        full_TS.index_copy_(0, rep_pos, rgrad_RS)
        red_OS, st = sparse_reduce_scatter(full_TS, p1, p0, algorithm=a)
        return grad_OS.add_(red_OS), st

    fns: dict[str, Any] = {}
    for a in ("a2a", "tree"):
        fns[f"rt_spag_old_{a}"] = lambda a=a: spag_old(a)
        fns[f"rt_spag_new_{a}"] = lambda a=a: sparse_all_gather(
            source, p0, p1, algorithm=a, new_only=True, out=rep_RS
        )
        fns[f"rt_sprs_old_{a}"] = lambda a=a: sprs_old(a)
        fns[f"rt_sprs_new_{a}"] = lambda a=a: sparse_reduce_scatter(
            rgrad_RS, p1, p0, algorithm=a, replicas_only=True, out=grad_OS, accumulate=True
        )
    return fns


def sweep_point(rank: int, W: int, p0: Placement, p1: Placement, reps: int, warm: int) -> dict:
    """Both sparse ops, both algorithms, vs all_gather_single / reduce_scatter_single."""
    fns = sparse_fns(rank, p0, p1, S) | runtime_fns(rank, p0, p1, S)
    shard, full, grads = torch.randn(E // W * S), torch.empty(E * S), torch.randn(E * S)
    fns["spag_dense"] = lambda: dist.all_gather_single(full, shard)
    fns["sprs_dense"] = lambda: dist.reduce_scatter_single(shard, grads)
    t = timed(fns, reps, warm)
    sparse_bytes = total(fns["spag_a2a"]()[1].bytes_recv)
    assert sparse_bytes == total(fns["sprs_a2a"]()[1].bytes_sent)
    assert sparse_bytes == total(fns["rt_spag_new_tree"]()[1].bytes_recv)
    assert sparse_bytes == total(fns["rt_sprs_new_tree"]()[1].bytes_sent)
    dense_bytes = (W - 1) * E * S * 4
    out: dict[str, Any] = {"W": W, "extra_pairs": len(p1.extra_pairs(p0))}
    for op in ("spag", "sprs"):
        out[op] = {
            "t_dense": t[f"{op}_dense"],
            "t_a2a": t[f"{op}_a2a"],
            "t_tree": t[f"{op}_tree"],
            "bytes_sparse": sparse_bytes,
            "bytes_dense": dense_bytes,
            "bytes_ratio": sparse_bytes / dense_bytes,
            "time_ratio_a2a": t[f"{op}_a2a"] / t[f"{op}_dense"],
            "time_ratio_tree": t[f"{op}_tree"] / t[f"{op}_dense"],
        }
    out["runtime"] = {
        op: {f"t_{v}_{a}": t[f"rt_{op}_{v}_{a}"] for v in ("old", "new") for a in ("a2a", "tree")}
        for op in ("spag", "sprs")
    }
    return out


def hot_point(
    rank: int, W: int, p0: Placement, p1: Placement, s: int, reps: int, warm: int
) -> dict:
    """Hot experts to every rank: the case the tree is for."""
    t = timed(sparse_fns(rank, p0, p1, s), reps, warm)
    return {op: {f"t_{a}": t[f"{op}_{a}"] for a in ("a2a", "tree")} for op in ("spag", "sprs")}


def worker(rank: int, W: int, quick: bool) -> dict | None:
    reps, warm = (5, 1) if quick else (15, 2)
    p0 = Placement.from_owners([e * W // E for e in range(E)], W)  # contiguous, like all-gather
    rng = random.Random(0)
    nonowner = [(e, r) for e in range(E) for r in range(W) if r != p0.owner[e]]
    model, raw = probe_cost_model(reps=60)
    res: dict[str, Any] = {"calibration": {"W": W, **raw, **vars(model)}}
    res["sweep"] = []
    for lam in LAMBDAS:
        add: dict[int, list[int]] = {}
        for e, r in rng.sample(nonowner, round(lam * len(nonowner))):
            add.setdefault(e, []).append(r)
        p1 = p0.with_replicas(add)
        point = sweep_point(rank, W, p0, p1, reps, warm)
        point.update(lam=lam, model=modelled(p0, p1, S * 4, DEFAULT_COST), placement=add)
        res["sweep"].append(point)
    res["hot"] = []
    sizes = (S // 16, S) if quick else (S // 64, S // 16, S // 4, S, 4 * S)
    for s in sizes:
        for k in (1, 4) if quick else (1, 2, 4):
            for layout in ("one-owner", "spread"):
                if layout == "spread" and k == 1:
                    continue
                ids = list(range(k)) if layout == "one-owner" else [i * E // k for i in range(k)]
                p1 = p0.with_replicas({e: range(W) for e in ids})
                point = hot_point(rank, W, p0, p1, s, reps, warm)
                point.update(
                    W=W,
                    expert_bytes=s * 4,
                    k=k,
                    layout=layout,
                    hot=ids,
                    model=modelled(p0, p1, s * 4, DEFAULT_COST),
                )
                res["hot"].append(point)
    return res if rank == 0 else None


def _entry(rank: int, W: int, port: int, quick: bool, queue: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=W,
        timeout=timedelta(seconds=300),
    )
    try:
        res = worker(rank, W, quick)
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def spawn(W: int, quick: bool) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, W, port, quick, queue)) for r in range(W)]
    for p in procs:
        p.start()
    res = queue.get(timeout=1200)
    for p in procs:
        p.join(timeout=60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"bench ranks exited with {[p.exitcode for p in procs]}")
    return res


def _features(p: dict) -> tuple[float, float, float, float]:
    """(a2a link bytes, a2a latency units, tree link bytes, tree rounds) of one measured point:
    the modelled costs are linear in the two CostModel constants."""
    W = p["W"]
    p0 = Placement.from_owners([e * W // E for e in range(E)], W)
    add = {int(e): r for e, r in p["placement"].items()} if "placement" in p else None
    p1 = p0.with_replicas(add if add is not None else {e: range(W) for e in p["hot"]})
    row = p.get("expert_bytes", S * 4)
    base, a, t = (
        algorithm_costs(p0, p1, expert_bytes=row, cost_model=CostModel(*c))
        for c in ((0, 0), (1, 0), (0, 1))
    )
    return base["a2a"], a["a2a"] - base["a2a"], base["tree"], t["tree"] - base["tree"]


def score_rule(res: dict) -> dict[str, Any]:
    """For each way of choosing: how often it picks the measured faster algorithm (or one
    within 10% of it) and the time it loses against always picking the faster one. Choosers:
    the rule with the default constants, with the constants probe_cost_model measured in
    this run, with the constants that fit this run best (grid search: in-sample, optimistic),
    and the two fixed algorithms."""
    cases = []
    for p in res["sweep"] + res["hot"]:
        f = _features(p)
        for op in ("spag", "sprs"):
            cases.append((p["W"], f, {a: p[op][f"t_{a}"] for a in ("a2a", "tree")}))

    def rule(A: float | dict[int, float], R: float | dict[int, float]) -> Callable[..., str]:
        def pick(W: int, f: tuple[float, float, float, float]) -> str:
            a = A[W] if isinstance(A, dict) else A
            r = R[W] if isinstance(R, dict) else R
            return "tree" if f[2] + r * f[3] < f[0] + a * f[1] else "a2a"

        return pick

    def score(pick: Callable[..., str]) -> dict[str, float]:
        sc = {"correct": 0, "within_10pct": 0, "lost_s": 0.0}
        for W, f, t in cases:
            got, best = t[pick(W, f)], min(t.values())
            sc["correct"] += got == best
            sc["within_10pct"] += got <= 1.1 * best
            sc["lost_s"] += got - best
        return sc

    cal = {c["W"]: c for c in res["calibration"]}
    grid = [0.0, 1e5, 2.5e5, 5e5, 7.5e5, 1e6, 1.5e6, 2e6, 4e6]
    fit = min(((A, R) for A in grid for R in grid), key=lambda ar: score(rule(*ar))["lost_s"])
    choosers = {
        "rule_default": rule(DEFAULT_COST.a2a_peer_bytes, DEFAULT_COST.round_bytes),
        "rule_measured": rule(
            {W: c["a2a_peer_bytes"] for W, c in cal.items()},
            {W: c["round_bytes"] for W, c in cal.items()},
        ),
        "rule_fitted": rule(*fit),
        "always_a2a": lambda W, f: "a2a",
        "always_tree": lambda W, f: "tree",
    }
    out: dict[str, Any] = {"cases": len(cases), "fitted_constants": fit}
    return out | {k: score(c) for k, c in choosers.items()}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, op, title in (
        (axes[0], "spag", "spAG vs all_gather"),
        (axes[1], "sprs", "spRS vs reduce_scatter"),
    ):
        for W, color in ((2, "tab:blue"), (4, "tab:red")):
            pts = [p for p in res["sweep"] if p["W"] == W]
            lam = [p["lam"] for p in pts]
            ax.plot(lam, [p[op]["time_ratio_a2a"] for p in pts], "-o", c=color, label=f"W={W} a2a")
            ax.plot(
                lam, [p[op]["time_ratio_tree"] for p in pts], "--s", c=color, label=f"W={W} tree"
            )
            ax.plot(lam, [p[op]["bytes_ratio"] for p in pts], ":", c=color, label=f"W={W} bytes")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(
            xlabel="lambda = fraction of non-owner pairs materialized",
            ylabel="sparse / dense (time; dotted: bytes)",
            title=title,
        )
        ax.legend(fontsize=7)
    ax = axes[2]
    for p in res["hot"]:
        for op, marker in (("spag", "o"), ("sprs", "^")):
            color = "tab:red" if p["W"] == 4 else "tab:blue"
            face = color if p["layout"] == "one-owner" else "none"
            ax.scatter(
                p["expert_bytes"],
                p[op]["t_tree"] / p[op]["t_a2a"],
                marker=marker,
                edgecolors=color,
                facecolors=face,
            )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="bytes per expert", ylabel="tree time / a2a time")
    ax.set_title(
        "hot experts to all ranks: o spAG, ^ spRS; red W=4, blue W=2; hollow = spread", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(res: dict) -> None:
    for p in res["sweep"]:
        cols = [
            f"{op}: bytes {p[op]['bytes_ratio']:.3f} time a2a {p[op]['time_ratio_a2a']:.2f} "
            f"tree {p[op]['time_ratio_tree']:.2f} (dense {p[op]['t_dense'] * 1e3:.1f}ms)"
            for op in ("spag", "sprs")
        ]
        print(f"W={p['W']} lam={p['lam']:<4}  " + "  ".join(cols))
    for p in res["sweep"]:
        rt = p["runtime"]
        ms = {(op, k): f"{v * 1e3:6.2f}ms" for op in rt for k, v in rt[op].items()}
        cols = [
            f"{op} {a}: old {ms[op, f't_old_{a}']} new {ms[op, f't_new_{a}']}"
            for op in rt
            for a in ("a2a", "tree")
        ]
        print(f"runtime W={p['W']} lam={p['lam']:<4}  " + "  ".join(cols))
    for p in res["hot"]:
        cols = [
            f"{op}: a2a {p[op]['t_a2a'] * 1e3:6.2f}ms tree {p[op]['t_tree'] * 1e3:6.2f}ms"
            for op in ("spag", "sprs")
        ]
        print(
            f"hot W={p['W']} {p['expert_bytes'] >> 10:5d}KiB k={p['k']} {p['layout']:9} "
            + "  ".join(cols)
        )
    for c in res["calibration"]:
        print("calibration", {k: round(v, 6) if k != "W" else v for k, v in c.items()})
    n = res["rule"]["cases"]
    print("fitted constants (a2a_peer_bytes, round_bytes):", res["rule"]["fitted_constants"])
    for name, sc in res["rule"].items():
        if isinstance(sc, dict):
            print(
                f"{name:14}: picks the faster in {sc['correct']}/{n} cases, within 10% in "
                f"{sc['within_10pct']}/{n}, {sc['lost_s'] * 1e3:.1f} ms lost in total"
            )


def collectives_section(quick: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"sweep": [], "hot": [], "calibration": []}
    for W in (2, 4):
        r = spawn(W, quick)
        for k in res:
            res[k] += r[k] if isinstance(r[k], list) else [r[k]]
    res["rule"] = score_rule(res)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sparse vs dense collectives (gloo)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (< 2 min)")
    ap.add_argument("--only", choices=("collectives", "schedules"), default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    t0 = time.time()
    path = args.out / "bench_collectives.json"
    if args.only == "schedules":  # refresh that section of the existing results
        res = json.loads(path.read_text()) if path.exists() else {}
        res["schedules"] = bench_schedules.schedule_timings(args.quick)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        bench_schedules.report(res["schedules"])
        print(f"wrote the schedules section of {path} in {time.time() - t0:.0f}s")
        return
    res = collectives_section(args.quick)
    if args.only is None:
        res["schedules"] = bench_schedules.schedule_timings(args.quick)
    res["config"] = {
        "E": E,
        "S": S,
        "dtype": "float32",
        "expert_bytes": S * 4,
        "backend": "gloo (loopback)",
        "quick": args.quick,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_end": os.getloadavg()[0],
        "wall_s": time.time() - t0,
        "default_cost_model": vars(DEFAULT_COST),
        "dense_ops": "all_gather_single / reduce_scatter_single (torch 2.13 names of "
        "all_gather_into_tensor / reduce_scatter_tensor)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    plot(res, args.out / "bench_collectives.png")
    report(res)
    if "schedules" in res:
        bench_schedules.report(res["schedules"])
    print(f"wrote {args.out}/bench_collectives.json and .png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
