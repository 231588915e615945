"""Array helpers shared by the planners and the dispatcher: segments and interval overlaps.

Legend: M, P, K lengths of the 1-D int64 host arrays involved ([Note: the control plane on the
host] in fssdp/host.py); a *segment* is a run of consecutive entries with the same key (callers
keep equal keys contiguous); a *line* lays lengths end to end, so entry i covers
[end_{i-1}, end_i). Everything is integer arithmetic, so every rank gets bit-identical results.
"""

from __future__ import annotations

import numpy as np


def excl_cumsum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Exclusive prefix sum along `axis` (the first entry is 0)."""
    return x.cumsum(axis) - x


def lengths(end: np.ndarray) -> np.ndarray:
    """Interval lengths of a line's ends (the first interval starts at 0)."""
    n = end.copy()
    n[1:] -= end[:-1]
    return n


def rank_in_runs(keys: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """Per entry: how many (`counted`) entries precede it in its run of equal, sorted `keys`."""
    if keys.size == 0:
        return keys.copy()
    idx = np.arange(keys.size)
    new = np.ones(keys.size, dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(idx * new)  # keys sorted: the run's first index
    if counted is None:
        return idx - first
    before = np.cumsum(counted, dtype=np.int64) - counted
    return before - before[first]


# [Note: overlaps on a line]
# Two sorted end sequences on one line, a_end (M entries) and b_end (K entries), both ending at
# the same total (callers clamp), describe a two-pointer fill: the overlap of a_i's interval
# with b_j's is what a_i sends to b_j, in line order. Every positive overlap ends either at an
# a-end or strictly inside a_i at a b-end, so the overlaps are (1) one per a_i, to the b
# interval that holds a_i's last unit, and (2) at most one per b_j, from the a interval that
# holds b_j's last unit when b_j ends strictly inside it. `overlaps_small` merges the two end
# lists with one sort (planner sizes); fssdp/fill.py and fssdp/plan_exact.py find (1) for a
# long a_end with a searchsorted of the short b_end into it and a histogram, O(M + K log M).


def overlaps_small(a_end: np.ndarray, b_end: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ia, ib, n) of every positive overlap, in line order; see [Note: overlaps on a line]."""
    ends = np.sort(np.concatenate([a_end, b_end]))
    n = lengths(ends)
    keep = n > 0
    start = (ends - n)[keep]
    ia = np.searchsorted(a_end, start, side="right")
    ib = np.searchsorted(b_end, start, side="right")
    return ia, ib, n[keep]
