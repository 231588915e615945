"""Which rows fill each holder's quota: local, then same node, then other nodes (fssdp.assign).

Legend: W ranks, E experts, N nodes of R ranks, P holder pairs (sorted by expert, then rank),
C cells = E * W (expert e, source s) laid out expert-major, G groups (expert, node) that have
a holder, K chunks in a sparse list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fssdp.segments import excl_cumsum

I64 = torch.int64

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
    """The chunks of one assignment. dense = (dst_C, rows_C) of the cross pass, one per cell
    (cell e * W + s); sparse = (cell_K, dst_K, rows_K): local keeps, the node pass, and the
    cross pass's chunks ending a holder's quota. Rows 0 mean no chunk."""

    dense: tuple[Tensor, Tensor]
    sparse_parts: tuple[list[Tensor], list[Tensor], list[Tensor]]

    @property
    def sparse(self) -> tuple[Tensor, Tensor, Tensor]:
        cells, dsts, rows = self.sparse_parts
        if len(cells) > 1:  # concatenated on first use
            cells[:] = [torch.cat(cells)]
            dsts[:] = [torch.cat(dsts)]
            rows[:] = [torch.cat(rows)]
        return cells[0], dsts[0], rows[0]


def _line(a_end: Tensor, a_len: Tensor, b_end: Tensor, b_len: Tensor) -> tuple[Tensor, ...]:
    """[Note: overlaps on a line] with both ends known to meet: per a (b index, rows), per b
    (a index, rows; 0 unless b ends strictly inside an a). In place where it can: the a side
    is the long one (every cell) and fresh memory is what costs there."""
    c = torch.searchsorted(a_end, b_end, right=True)  # a ends <= b_j
    j = torch.bincount(c, minlength=a_end.numel() + 1)[:-1].cumsum_(0)  # b holding a_i's end
    n_a = (b_end - b_len).index_select(0, j)
    torch.sub(a_end, n_a, out=n_a)
    torch.minimum(n_a, a_len, out=n_a)
    i = torch.searchsorted(a_end, b_end)  # a holding b_j's end
    n_b = torch.minimum(b_len, b_end - (a_end.index_select(0, i) - a_len.index_select(0, i)))
    n_b *= b_end < a_end.index_select(0, i)
    return j, n_a, i, n_b


def _node_pass(
    left_C: Tensor, free_P: Tensor, expert_P: Tensor, rank_P: Tensor, W: int, R: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pass 2 on the groups with a holder: (cell, dst, rows) of its chunks, and what is left
    of the sources (left_C, updated in place) and of the holders' free quota."""
    N = W // R
    g_P = expert_P * N + rank_P // R
    g_G, gi_P = torch.unique_consecutive(g_P, return_inverse=True)
    cell_GR = (g_G // N * W + g_G % N * R)[:, None] + torch.arange(R, device=g_P.device)
    src_GR = left_C.index_select(0, cell_GR.reshape(-1)).view(-1, R)
    cs_GR = src_GR.cumsum(1)
    free_G = torch.zeros_like(g_G).index_add_(0, gi_P, free_P)
    t_G = torch.minimum(cs_GR[:, -1], free_G)
    off_G = excl_cumsum(t_G)
    a_end = (torch.minimum(cs_GR, t_G[:, None]) + off_G[:, None]).view(-1)
    a_len = a_end - torch.cat([a_end.new_zeros(1), a_end[:-1]])
    b_end = free_P.cumsum(0) - excl_cumsum(free_G).index_select(0, gi_P)
    b_end = torch.minimum(b_end, t_G.index_select(0, gi_P)) + off_G.index_select(0, gi_P)
    b_len = b_end - torch.cat([b_end.new_zeros(1), b_end[:-1]])
    j, n_a, i, n_b = _line(a_end, a_len, b_end, b_len)
    cells = cell_GR.view(-1)
    left_C.index_add_(0, cells, -a_len)
    return (torch.cat([cells, cells.index_select(0, i)]),
            torch.cat([rank_P.index_select(0, j), rank_P]), torch.cat([n_a, n_b]),
            free_P - b_len, cells)


def fill(
    counts_EW: Tensor, expert_P: Tensor, rank_P: Tensor, cell_P: Tensor, rows_P: Tensor, R: int
) -> Fill:
    """The chunks of [Note: filling quotas] for counts_EW [E, W] and quotas rows_P (cell_P =
    expert_P * W + rank_P)."""
    E, W = counts_EW.shape
    left_C = counts_EW.reshape(-1)
    keep_P = torch.minimum(left_C.index_select(0, cell_P), rows_P)
    left_C = left_C.index_add(0, cell_P, -keep_P)
    free_P = rows_P - keep_P
    cells, dsts, rows = [cell_P], [rank_P], [keep_P]
    if W > R:
        c, d, n, free_P, _ = _node_pass(left_C, free_P, expert_P, rank_P, W, R)
        cells.append(c)
        dsts.append(d)
        rows.append(n)
    a_end, b_end = left_C.cumsum(0), free_P.cumsum(0)  # per expert the two totals agree
    j, n_a, i, n_b = _line(a_end, left_C, b_end, free_P)
    cells.append(i)
    dsts.append(rank_P)
    rows.append(n_b)
    return Fill((rank_P.index_select(0, j), n_a), (cells, dsts, rows))
