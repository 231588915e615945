"""Inputs and the lower bound of the planner benchmark (perf/bench_planner.py).

Legend: W ranks, E experts, R ranks per node, m the memory cap, L_E rows per expert over all
sources, counts_WE rows per source rank and expert (16384 rows per rank, as a 16k-token
micro-batch with top-1 or an 8k one with top-2 would route).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from perf.cost_model import even_sources, scale_rows

ROWS_PER_RANK = 16384
TRACES = Path(__file__).parent / "results" / "traces"
I64 = torch.int64


def zipf_counts(W: int, E: int, s: float, seed: int = 0, sort: bool = False) -> Tensor:
    """Expert popularity 1 / rank^s (hot experts at random ids unless `sort`: hottest first,
    all on the first owners under contiguous sharding), lognormal noise (sigma 0.3) per source.
    The popularity depends on E only, the noise on `seed` (seed 1 is the lagged estimate)."""
    w = 1.0 / (torch.arange(E, dtype=torch.float64) + 1) ** s
    if not sort:
        w = w[torch.randperm(E, generator=torch.Generator().manual_seed(E))]
    g = torch.Generator().manual_seed(1000 * seed + E)
    noise = torch.exp(0.3 * torch.randn(W, E, generator=g, dtype=torch.float64))
    p = w * noise
    return (p / p.sum(1, keepdim=True) * ROWS_PER_RANK).floor().to(I64)


def one_expert(W: int, E: int, seed: int = 0) -> Tensor:
    """Every token to one expert (the third)."""
    c = torch.zeros(W, E, dtype=I64)
    c[:, E // 3] = ROWS_PER_RANK
    return c


def many_empty(W: int, E: int, seed: int = 0) -> Tensor:
    """7 of 8 experts get nothing; the rest Zipf 1.0."""
    c = zipf_counts(W, E, 1.0, seed + 7)
    g = torch.Generator().manual_seed(E + 11)
    live = torch.zeros(E, dtype=torch.bool)
    live[torch.randperm(E, generator=g)[: max(1, E // 8)]] = True
    return c * live


def trace_loads(traces: Path = TRACES) -> dict[str, tuple[list[int], list[int]]]:
    """Per recorded trace (launch/routing_trace.py format): the rows per expert of its first
    bank at its last step, and at the step before (the lagged estimate)."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    for f in sorted(traces.glob("*.jsonl")):
        lines = [ln for ln in f.read_text().splitlines()[1:] if ln.strip()]
        if len(lines) < 2:
            continue
        last, prev = json.loads(lines[-1])["banks"], json.loads(lines[-2])["banks"]
        bank = sorted(last)[0]
        out[f"trace:{f.stem}"] = (last[bank], prev.get(bank, last[bank]))
    return out


def trace_counts(load_E: list[int], W: int) -> Tensor:
    """A trace step scaled to ROWS_PER_RANK rows per rank, split evenly over the sources."""
    return even_sources(scale_rows(load_E, W * ROWS_PER_RANK), W)


Case = Callable[[int, int, int], Tensor]  # (W, E, seed) -> counts_WE
SYNTHETIC: dict[str, Case] = {
    "zipf0.5": lambda W, E, s: zipf_counts(W, E, 0.5, s),
    "zipf1.0": lambda W, E, s: zipf_counts(W, E, 1.0, s),
    "zipf1.5": lambda W, E, s: zipf_counts(W, E, 1.5, s),
    "zipf2.0": lambda W, E, s: zipf_counts(W, E, 2.0, s),
    "zipf1.0_sorted": lambda W, E, s: zipf_counts(W, E, 1.0, s, sort=True),
    "one_expert": one_expert,
    "many_empty": many_empty,
}


# [Note: lower bound]
# No placement reaches busiest-rank rows below lam when lam fails either of:
#   (1) lam >= ceil(total / W) (the mean, in whole rows);
#   (2) the replicas lam needs fit in the free slots (W m): an expert with L_e > lam rows needs
#       ceil(L_e / lam) holders, hence ceil(L_e / lam) - 1 replicas (and at most W holders),
#       and an owner whose experts that stay unreplicated exceed lam rows must replicate some:
#       at least as many as it takes, heaviest first, to bring the rest to lam (one replica each
#       at least), since an unreplicated expert's rows all run on its owner.
# The bound is the least lam passing both (binary search on lam; (2) only gets easier as lam
# grows), over the mean. It ignores that a replica's rows must fit the rank it lands on and that
# nodes fix their share of a replicated expert, so it can be loose, never too high.


def _slots_needed(L_E: Tensor, owner_E: Tensor, lam: int) -> int | None:
    """Replicas busiest-rank rows <= lam requires ([Note: lower bound] (2)); None: impossible."""
    need = (L_E + lam - 1) // lam  # holders each expert needs
    forced = need > 1
    order = torch.argsort(owner_E * (1 << 42) + L_E, stable=True)  # per owner, lightest first
    Ls, os_, fs = L_E[order], owner_E[order], forced[order]
    kept = torch.where(fs, 0, Ls)
    base = torch.zeros(int(owner_E.max()) + 1 if owner_E.numel() else 1, dtype=I64)
    base.index_add_(0, os_, kept)
    cum = kept.cumsum(0) - (base.cumsum(0) - base)[os_]  # light experts kept in order
    extra = ~fs & (cum > lam)  # beyond lam they must be replicated too
    return int((need - 1).clamp(min=0).sum() + extra.sum())


def lower_bound(counts_WE: Tensor, owner_E: Tensor, m: int) -> float:
    """[Note: lower bound]: busiest-rank rows no placement with cap m goes below, over the mean."""
    W = counts_WE.shape[0]
    L_E = counts_WE.sum(0)
    total = int(L_E.sum())
    if total == 0:
        return 1.0
    lo = max(-(-total // W), -(-int(L_E.max()) // W))
    hi = max(lo, int(L_E.max()) + int(torch.zeros(W, dtype=I64).index_add_(0, owner_E, L_E).max()))
    while lo < hi:  # log2(rows) probes
        mid = (lo + hi) // 2
        if _slots_needed(L_E, owner_E, mid) <= W * m:
            hi = mid
        else:
            lo = mid + 1
    return lo / (total / W)
