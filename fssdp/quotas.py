"""Rows each holder computes, per expert: the quota rule behind `fssdp.assign.assign_tokens`.

Legend: W ranks, E experts, N nodes of R ranks, P holder pairs of a placement (sorted by
expert, then rank), g a group = (expert, node) of pairs, L_E rows per expert over all sources.
Every function is integer numpy code on host arrays ([Note: the control plane on the host] in
fssdp/host.py); every rank gets the same rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from collectives.placement import Placement, Topology
from fssdp.host import HostPlacement, add_at, host, host_array
from fssdp.segments import excl_cumsum, overlaps_small

# [Note: even split, then nearest replica]
# The point of replicas is balance, so balance is the hard rule: expert e's L_e rows are split
# over its holders H_e in rank order by cumulative rounding, holder j (0-based) computing
# floor(L_e (j+1) / |H_e|) - floor(L_e j / |H_e|): floor or ceil of L_e / |H_e|, exact sums,
# and a node computes floor(L_e K_le / |H_e|) - floor(L_e K_lt / |H_e|) (K_le / K_lt: holders
# in nodes up to / before it), its holders' share within one row. Locality only decides
# *which* rows fill each quota (fssdp/fill.py): a holder keeps its own rows up to its quota,
# then the rest of a node's rows fill its holders, then whatever is left crosses nodes. When
# each node's rows of e equal its holders' share (uniform counts, the same number of holders
# per node) nothing crosses nodes; a node with more rows than its holders' share sends the
# excess away: balance wins over locality.

# [Note: levelling quotas]
# An even split balances each replicated expert but not the ranks: an owner also computes all
# rows of its unreplicated experts, so under skew the owner of the hot experts' neighbours stays
# the straggler. Levelling fixes it with the replicas already there, inside each node (a node
# computes exactly the rows the even split gives it, so no more rows cross nodes). In a node,
# groups with one holder there fix a base load per rank; the rows of groups with several
# holders there (flexible) are poured like water over the ranks that hold any of them, lowest
# base first, up to a common integer level (leftover rows one each to the lowest), which gives
# each such rank a room. The flexible groups, ordered by their lowest holder rank, then fill
# the rooms in rank order, two pointers on one line: exact when every such rank holds every
# flexible group of the node, or when the groups' holders run in rank order (a chain); a piece
# that lands on a rank without the expert goes to the group's lowest-rank holder instead. For
# other structures integer proportional fitting does better (FIT_ROUNDS rounds: scale each
# rank's flexible rows to its room, then each group's to its rows, exact by cumulative
# rounding); of the two, the one with the lower busiest rank is kept (ties: the line). It
# moves more rows between ranks of a node, so it is used only when it lowers the
# busiest rank's rows by more than LEVEL_GAIN of them; otherwise the even split stands.
LEVEL_GAIN = 0.02
FIT_ROUNDS = 8

# [Note: planned rows]
# The exact planner and calibration decide every holder's rows while they place replicas
# (that is how they balance), and attach them to the placement they return together with the
# counts they planned for (collectives.placement.PlannedRows). For those same counts the
# dispatcher computes exactly those rows; for any other counts (or a placement built another
# way) it applies the even split and levelling above. Planned rows always sum to each
# expert's rows over its holders, so the result is a valid assignment either way.


def even_rows(L_E: np.ndarray, hp: HostPlacement) -> np.ndarray:
    """rows_P of [Note: even split, then nearest replica]."""
    pe, E = hp.expert_P, hp.num_experts
    if pe.size == E:  # one holder per expert: it computes everything
        return L_E.copy()
    nh_E = np.bincount(pe, minlength=E)
    j_P = np.arange(pe.size) - excl_cumsum(nh_E)[pe]
    L_P, n_P = L_E[pe], nh_E[pe]
    return (L_P * (j_P + 1)) // n_P - (L_P * j_P) // n_P


def load_W(rows_P: np.ndarray, rank_P: np.ndarray, world_size: int) -> np.ndarray:
    return add_at(world_size, rank_P, rows_P)


def water_fill(
    group_s: np.ndarray, load_s: np.ndarray, total_G: np.ndarray, open_s: np.ndarray
) -> np.ndarray:
    """Rows each entry takes when every group pours total_G over its open entries, lowest load
    first, up to a common integer level (leftover rows one each to the lowest).

    Entries are sorted by group, then (open first) load ascending; closed entries take 0."""
    n, G = group_s.size, total_G.size
    first_s = excl_cumsum(np.bincount(group_s, minlength=G))[group_s]
    j_s = np.arange(n) - first_s
    pre_s = load_s.cumsum()
    pre_s = pre_s - (pre_s - load_s)[first_s]  # the group's loads up to and including me
    T_s = total_G[group_s]
    under_s = open_s & (T_s + pre_s >= (j_s + 1) * load_s)  # the water covers me
    k_s = np.maximum(np.bincount(group_s[under_s], minlength=G)[group_s], 1)
    total_s = T_s + pre_s[np.minimum(first_s + k_s - 1, max(n - 1, 0))]
    level_s, extra_s = total_s // k_s, total_s % k_s
    return (level_s - load_s + (j_s < extra_s)) * under_s


def flexible(hp: HostPlacement, topology: Topology) -> tuple[np.ndarray, np.ndarray]:
    """(group_P, flex_P): each pair's (expert, node) group, and whether the group has several
    holders in that node (its rows can be levelled there)."""
    g_P = hp.cell_P // topology.ranks_per_node  # = e * N + node: sorted, contiguous
    k_P = np.bincount(g_P, minlength=hp.num_experts * topology.num_nodes)[g_P]
    return g_P, k_P > 1


def levelled_rows(
    even_P: np.ndarray, hp: HostPlacement, topology: Topology, g_P: np.ndarray,
    flex_P: np.ndarray,
) -> np.ndarray:
    """rows_P per [Note: levelling quotas]."""
    pe, pr = hp.expert_P, hp.rank_P
    E, W, P = hp.num_experts, hp.world_size, pe.size
    N, R = topology.num_nodes, topology.ranks_per_node
    flex_rows = even_P * flex_P
    base_W = load_W(even_P - flex_rows, pr, W)
    open_W = np.bincount(pr[flex_P], minlength=W) > 0
    node_W = np.arange(W) // R
    F_N = add_at(N, pr // R, flex_rows)
    order = np.argsort(node_W * (1 << 43) + (~open_W) * (1 << 42) + base_W, kind="stable")
    room_W = np.empty(W, dtype=np.int64)
    room_W[order] = water_fill(node_W[order], base_W[order], F_N, open_W[order])
    # flexible groups (their first pair), by node then lowest holder rank; rooms in rank order
    head = np.flatnonzero(flex_P & (shift_g(g_P) != g_P))
    head = head[np.argsort(pr[head] * (1 << 20) + head, kind="stable")]
    T_G = add_at(E * N, g_P, flex_rows)
    ia, ib, n = overlaps_small(T_G[g_P[head]].cumsum(), room_W.cumsum())
    cells = hp.cell_P
    want = pe[head[ia]] * W + ib
    at = np.minimum(np.searchsorted(cells, want), cells.size - 1)
    ok = cells[at] == want
    x_P = add_at(P, at, n * ok)
    # a piece whose rank lacks the expert goes to the group's first holder instead
    line_P = np.where(flex_P, x_P, even_P) + add_at(P, head[ia], n * ~ok)
    fit_P = np.where(flex_P, _fit(flex_rows, pr, g_P, room_W, T_G), even_P)
    better = load_W(fit_P, pr, W).max() < load_W(line_P, pr, W).max()
    return fit_P if better else line_P


def _fit(
    x_P: np.ndarray, rank_P: np.ndarray, g_P: np.ndarray, room_W: np.ndarray, T_G: np.ndarray
) -> np.ndarray:
    """Flexible rows fitted to the rooms, alternately per rank (scaled to its room) and per
    group (scaled to its rows), FIT_ROUNDS times, then each group's rows split exactly in
    proportion (integer proportional fitting, [Note: levelling quotas])."""
    W = room_W.size
    room_P = room_W[rank_P]
    for _ in range(FIT_ROUNDS):  # a fixed number of rounds
        col = load_W(x_P, rank_P, W)[rank_P]
        x_P = np.where(col > 0, x_P * room_P // np.maximum(col, 1), 0)
        x_P = _split_like(T_G, g_P, x_P)
    return x_P


def _split_like(amount_G: np.ndarray, g_P: np.ndarray, weight_P: np.ndarray) -> np.ndarray:
    """amount_G split over each group's entries in proportion to weight_P (cumulative rounding,
    exact sums; evenly when a group's weights are all 0)."""
    G = amount_G.size
    w_P = np.where(add_at(G, g_P, weight_P)[g_P] == 0, 1, weight_P)
    t = add_at(G, g_P, w_P)[g_P]
    cum = w_P.cumsum()
    first = excl_cumsum(np.bincount(g_P, minlength=G))[g_P]
    cum = cum - (cum - w_P)[first]
    a = amount_G[g_P]
    return (a * cum) // t - (a * (cum - w_P)) // t


def shift_g(g: np.ndarray) -> np.ndarray:
    """g moved one place right, -1 entering (marks each group's first entry)."""
    return np.concatenate([[-1], g[:-1]])


def holder_rows(counts_WE: Tensor, placement: Placement, topology: Topology) -> np.ndarray:
    """rows_P (host int64) for `counts_WE` under `placement`: [Note: planned rows] when they
    apply, else the even split, levelled when that pays ([Note: levelling quotas])."""
    planned = placement.planned
    if planned is not None and (
        planned.counts_WE is counts_WE
        or (
            planned.counts_WE.shape == counts_WE.shape
            and planned.counts_WE.device == counts_WE.device
            and torch.equal(planned.counts_WE, counts_WE)
        )
    ):
        return host_array(planned.rows_P)
    hp = host(placement)
    even_P = even_rows(host_array(counts_WE).sum(0), hp)
    if placement.is_ownership_only():
        return even_P
    g_P, flex_P = flexible(hp, topology)
    if not flex_P.any():  # no node holds any expert twice: nothing to level
        return even_P
    lev_P = levelled_rows(even_P, hp, topology, g_P, flex_P)
    W = placement.world_size
    top_even, top_lev = load_W(even_P, hp.rank_P, W).max(), load_W(lev_P, hp.rank_P, W).max()
    return lev_P if top_lev * 50 < top_even * 49 else even_P  # gain > LEVEL_GAIN = 1/50
