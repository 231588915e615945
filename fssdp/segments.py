"""Array helpers shared by the planners and the dispatcher: segments and interval overlaps.

Legend: M, P, K lengths of the 1-D int64 tensors involved; a *segment* is a run of consecutive
entries with the same key (callers keep equal keys contiguous); a *line* lays lengths end to
end, so entry i covers [end_{i-1}, end_i). Everything is integer arithmetic and runs on any
device, so every rank gets bit-identical results.
"""

from __future__ import annotations

import torch
from torch import Tensor

I64 = torch.int64


def excl_cumsum(x: Tensor, dim: int = 0) -> Tensor:
    """Exclusive prefix sum along `dim` (the first entry is 0)."""
    return x.cumsum(dim) - x


def shift_right(x: Tensor) -> Tensor:
    """x moved one place to the right along the last dim, 0 entering on the left."""
    return torch.nn.functional.pad(x[..., :-1], (1, 0))


def rank_in_runs(keys: Tensor, counted: Tensor | None = None) -> Tensor:
    """Per entry: how many (`counted`) entries precede it in its run of equal, sorted `keys`."""
    if keys.numel() == 0:
        return keys.clone()
    idx = torch.arange(keys.numel(), device=keys.device)
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    first = torch.cummax(idx * new, 0).values  # keys sorted: the run's first index
    if counted is None:
        return idx - first
    before = excl_cumsum(counted.to(I64))
    return before - before.index_select(0, first)


# [Note: overlaps on a line]
# Two sorted end sequences on one line, a_end (M entries) and b_end (K entries), both ending at
# the same total (callers clamp), describe a two-pointer fill: the overlap of a_i's interval
# with b_j's is what a_i sends to b_j, in line order. Every positive overlap ends either at an
# a-end or strictly inside a_i at a b-end, so the overlaps are (1) one per a_i, to the b
# interval that holds a_i's last unit, and (2) at most one per b_j, from the a interval that
# holds b_j's last unit when b_j ends strictly inside it. `overlaps_small` merges the two end
# lists with one sort (planner sizes); `overlaps_by_a` finds (1) for a long a_end with a
# searchsorted of the short b_end into it and a histogram, O(M + K log M), no sort of M.


def overlaps_small(a_end: Tensor, b_end: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(ia, ib, n) of every positive overlap, in line order; see [Note: overlaps on a line]."""
    ends = torch.cat([a_end, b_end]).sort().values
    n = ends - shift_right(ends)
    keep = n > 0
    start = (ends - n)[keep]
    ia = torch.searchsorted(a_end, start, right=True)
    ib = torch.searchsorted(b_end, start, right=True)
    return ia, ib, n[keep]


def overlaps_by_a(
    a_end: Tensor, b_end: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per a_i: (b index, rows) of its last overlap; per b_j: (a index, rows) of the overlap
    ending at b_j strictly inside an a interval (rows 0 where none). [Note: overlaps on a line]"""
    M, K = a_end.numel(), b_end.numel()
    if K == 0 or M == 0:
        z_a, z_b = torch.zeros_like(a_end), torch.zeros_like(b_end)
        return z_a, z_a, z_b, z_b
    a_prev, b_prev = shift_right(a_end), shift_right(b_end)
    c_K = torch.searchsorted(a_end, b_end, right=True)  # a ends <= b_j
    hist = torch.zeros(M + 1, dtype=I64, device=a_end.device)
    hist.index_add_(0, c_K, torch.ones_like(c_K))
    j_M = hist[:M].cumsum(0).clamp_(max=K - 1)  # b interval holding a_i's last unit
    n_M = (a_end - torch.maximum(a_prev, b_prev[j_M])).clamp_(min=0)
    i_K = torch.searchsorted(a_end, b_end).clamp_(max=M - 1)  # a interval holding b_j's end
    inside = b_end < a_end[i_K]
    n_K = (b_end - torch.maximum(b_prev, a_prev[i_K])).clamp_(min=0) * inside
    return j_M, n_M, i_K, n_K
