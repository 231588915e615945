"""Schedule construction at cluster scale, in one process: what every rank computes per bank per
step before a sparse collective moves anything (the "schedules" section of
perf/results/bench_collectives.json; `python -m perf.bench_collectives --only schedules`).

Legend: E experts, W ranks (8 per node for the tree's topology), N new holder pairs. Placements:
owners contiguous (expert e on rank e * W // E), and each rank draws `PER_RANK` distinct experts
by Zipf(1.2) weights over a fixed random order of the experts (a hot few get most replicas).
A time is the median over repeats, each on freshly built placements (no cached views), in ms.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from collectives import Placement, Topology, choose
from collectives.schedule import direct_schedule, tree_schedule

WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024)
EXPERTS = (64, 256)
PER_RANK = 2
ZIPF = 1.2


def zipf_holders(E: int, W: int, seed: int = 0) -> tuple[list[int], list[set[int]]]:
    """(owner per expert, holder set per expert) of a Zipf-skewed placement (module legend)."""
    g = torch.Generator().manual_seed(seed)
    owner = [e * W // E for e in range(E)]
    w_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF
    w_E = w_E[torch.randperm(E, generator=g)]
    pick_WK = torch.multinomial(w_E.expand(W, E), min(PER_RANK, E), generator=g)
    holders = [{o} for o in owner]
    for r, es in enumerate(pick_WK.tolist()):
        for e in es:
            holders[e].add(r)
    return owner, holders


def fresh(E: int, W: int, owner: list[int], holders: list[set[int]]) -> tuple[Placement, Placement]:
    """New placement objects (P0, P1), so no view a previous repeat built is reused."""
    p0 = Placement(E, W, list(owner), [{o} for o in owner])
    return p0, Placement(E, W, list(owner), [set(h) for h in holders])


def _median_ms(
    fn: Callable[[Placement, Placement], Any],
    E: int,
    W: int,
    owner: list[int],
    holders: list[set[int]],
    reps: int,
) -> float:
    ts = []
    for _ in range(reps):
        p0, p1 = fresh(E, W, owner, holders)
        t0 = time.perf_counter()
        fn(p0, p1)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def schedule_timings(quick: bool = False) -> list[dict[str, Any]]:
    """Per (E, W): direct and tree schedule, `choose` with algorithm='auto' (every registered
    algorithm's schedule and cost, built once), and the hottest owner's own part of the chosen
    schedule (`for_rank`), each in ms."""
    reps = 3 if quick else 9
    worlds = (8, 64, 1024) if quick else WORLDS
    out = []
    for E in EXPERTS:
        for W in worlds:
            owner, holders = zipf_holders(E, W)
            topo = Topology(W, min(8, W))
            hot = max(range(E), key=lambda e: len(holders[e]))

            def auto(p0: Placement, p1: Placement, t: Topology = topo) -> Any:
                return choose(p0, p1, expert_bytes=1 << 20, topology=t)

            def auto_and_view(p0: Placement, p1: Placement, r: int = owner[hot]) -> Any:
                return auto(p0, p1).schedule.for_rank(r)

            fns = {
                "direct_ms": lambda a, b: direct_schedule(a, b),
                "tree_ms": lambda a, b, t=topo: tree_schedule(a, b, t),
                "choose_ms": auto,
                "choose_and_rank_view_ms": auto_and_view,
            }
            rec: dict[str, Any] = {"E": E, "W": W}
            rec |= {k: _median_ms(fn, E, W, owner, holders, reps) for k, fn in fns.items()}
            p0, p1 = fresh(E, W, owner, holders)
            picked = auto(p0, p1)
            rec.update(
                extra_pairs=len(p1.extra_pairs(p0)),
                max_new_holders=max(len(h) - 1 for h in holders),
                picked=picked.name,
                tree_rounds=len(tree_schedule(p0, p1, topo)),
            )
            out.append(rec)
    return out


def report(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"schedules E={r['E']:3d} W={r['W']:4d} N={r['extra_pairs']:4d}: direct "
            f"{r['direct_ms']:.2f} ms, tree {r['tree_ms']:.2f} ms, choose(auto) "
            f"{r['choose_ms']:.2f} ms (+ rank view {r['choose_and_rank_view_ms']:.2f} ms), "
            f"picks {r['picked']}"
        )
