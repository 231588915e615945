"""Which rows fill each holder's quota: local, then same node, then other nodes (fssdp.assign).

Legend: W ranks, E experts, N nodes of R ranks, P holder pairs (sorted by expert, then rank),
C cells = E * W (expert e, source s) laid out expert-major, G groups (expert, node) that have
a holder, K chunks in a sparse list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fssdp.host import add_at
from fssdp.segments import excl_cumsum, lengths

# [Note: filling quotas]
# Given each holder's quota ([Note: even split, then nearest replica] in fssdp/quotas.py):
#   1. local: a holder keeps min(own rows, quota) of its own rows (they never move);
#   2. node: per (expert, node), the sources' leftover rows, in rank order, fill the free quota
#      of the node's holders, in rank order (two pointers);
#   3. cross: per expert, whatever is left, sources in rank order, fills the holders with free
#      quota anywhere, in rank order.
# A pass lays all its groups end to end on one line, the sources' leftovers on one side and the
# holders' free quota on the other, so the pass is one [Note: overlaps on a line] (one chunk per
# source cell ending its rows, one per holder ending its quota strictly inside a source). In the
# cross pass every expert's leftovers equal its holders' free quota, so the two lines are plain
# prefix sums over all cells and all pairs. The node pass only touches groups with a holder
# (gathered first: at large W most (expert, node) groups have none) and clamps both sides to
# what the group can move. A source's rows of one expert are cut into chunks in destination
# order: rows cross nodes only when their node's holders are full (or absent).


@dataclass(frozen=True)
class Fill:
    """The chunks of one assignment, as host arrays ([Note: the control plane on the host] in
    fssdp/host.py). dense = (dst_C, rows_C) of the cross pass, one per cell (cell e * W + s);
    sparse = (cell_K, dst_K, rows_K): local keeps, the node pass, and the cross pass's chunks
    ending a holder's quota. Rows 0 mean no chunk."""

    dense: tuple[np.ndarray, np.ndarray]
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray]


def _line(
    a_end: np.ndarray, a_len: np.ndarray, b_end: np.ndarray, b_len: np.ndarray
) -> tuple[np.ndarray, ...]:
    """[Note: overlaps on a line] with both ends known to meet: per a (b index, rows), per b
    (a index, rows; 0 unless b ends strictly inside an a). In place where it can: the a side
    is the long one (every cell) and fresh memory is what costs there (page faults)."""
    c = np.searchsorted(a_end, b_end, side="right")  # a ends <= b_j
    j = np.bincount(c, minlength=a_end.size + 1)[:-1]
    np.cumsum(j, out=j)  # b holding a_i's end
    n_a = (b_end - b_len)[j]
    np.subtract(a_end, n_a, out=n_a)
    np.minimum(n_a, a_len, out=n_a)
    i = np.searchsorted(a_end, b_end)  # a holding b_j's end
    a_i = a_end[i]
    n_b = np.minimum(b_len, b_end - (a_i - a_len[i])) * (b_end < a_i)
    return j, n_a, i, n_b


def _node_pass(
    left_C: np.ndarray, free_P: np.ndarray, expert_P: np.ndarray, rank_P: np.ndarray, W: int,
    R: int,
) -> tuple[np.ndarray, ...]:
    """Pass 2 on the groups with a holder: (cell, dst, rows) of its chunks, and what is left
    of the sources (left_C, updated in place) and of the holders' free quota."""
    N = W // R
    g_P = expert_P * N + rank_P // R  # sorted: pairs run by expert, then rank
    first = np.ones(g_P.size, dtype=bool)
    first[1:] = g_P[1:] != g_P[:-1]
    g_G, gi_P = g_P[first], np.cumsum(first) - 1
    cell_GR = (g_G // N * W + g_G % N * R)[:, None] + np.arange(R)
    cells = cell_GR.ravel()
    cs_GR = left_C[cells].reshape(-1, R).cumsum(1)
    free_G = add_at(g_G.size, gi_P, free_P)
    t_G = np.minimum(cs_GR[:, -1], free_G)
    off_G = excl_cumsum(t_G)
    a_end = (np.minimum(cs_GR, t_G[:, None]) + off_G[:, None]).ravel()
    a_len = lengths(a_end)
    b_end = free_P.cumsum() - excl_cumsum(free_G)[gi_P]
    b_end = np.minimum(b_end, t_G[gi_P]) + off_G[gi_P]
    b_len = lengths(b_end)
    j, n_a, i, n_b = _line(a_end, a_len, b_end, b_len)
    left_C[cells] -= a_len  # cells are distinct
    return (np.concatenate([cells, cells[i]]), np.concatenate([rank_P[j], rank_P]),
            np.concatenate([n_a, n_b]), free_P - b_len)


def fill(
    counts_EW: np.ndarray, expert_P: np.ndarray, rank_P: np.ndarray, cell_P: np.ndarray,
    rows_P: np.ndarray, R: int,
) -> Fill:
    """The chunks of [Note: filling quotas] for counts_EW [E, W] (contiguous; overwritten: it
    becomes the rows left to place) and quotas rows_P (cell_P = expert_P * W + rank_P), all
    host arrays."""
    E, W = counts_EW.shape
    left_C = counts_EW.reshape(-1)
    keep_P = np.minimum(left_C[cell_P], rows_P)
    left_C[cell_P] -= keep_P  # pairs are distinct cells
    free_P = rows_P - keep_P
    cells, dsts, rows = [cell_P], [rank_P], [keep_P]
    if W > R:
        c, d, n, free_P = _node_pass(left_C, free_P, expert_P, rank_P, W, R)
        cells.append(c)
        dsts.append(d)
        rows.append(n)
    a_end, b_end = left_C.cumsum(), free_P.cumsum()  # per expert the two totals agree
    j, n_a, i, n_b = _line(a_end, left_C, b_end, free_P)
    cells.append(i)
    dsts.append(rank_P)
    rows.append(n_b)
    sparse = (np.concatenate(cells), np.concatenate(dsts), np.concatenate(rows))
    return Fill((rank_P[j], n_a), sparse)
