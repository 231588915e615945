"""Exact placement (after routing) and calibration: replicas and their rows, in one go.

Legend: W ranks, E experts, P holder pairs of the base placement, B candidate plans, S
overlaps (candidate replicas with their rows), lam the target rows per rank (the mean, rounded
up). Integer numpy code on host arrays ([Note: the control plane on the host] in fssdp/host.py);
the placement returned lives on the counts' device. Ties break by expert id, then rank id, so
every rank plans the same placement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from collectives.placement import Placement, PlannedRows, Topology
from fssdp.host import add_at, from_cells, host, host_array
from fssdp.plan_nodes import (
    DENSE_PER_KEY,
    cross_node_rows,
    node_first_rows,
    node_shortfall,
    rows_by_node,
)
from fssdp.quotas import holder_rows
from fssdp.segments import lengths, rank_in_runs

BIG = 1 << 42  # above any row count a bank sees in one step (checked in _check_rows)

# [Note: exact mode]
# With the true counts known, every rank above lam = ceil(total / W) rows sheds its rows down
# to a keep level, largest holding first (ties: expert id); the shed pieces, largest first, are
# laid end to end on one line and the ranks' rooms (lam minus what they kept, ranks with a
# free slot only) on another; two pointers on the line ([Note: overlaps on a line] in
# fssdp/segments.py) cut each piece into the rooms it overlaps, and each cut is a replica with
# exactly those rows ([Note: planned rows] in fssdp/quotas.py). A hot expert's piece spans many
# rooms (as many copies as it needs, each a full rank's worth); an owner with a pile of
# middling experts sheds them whole to single rooms. A room takes at most its free slots of new
# replicas, its largest cuts first (a piece's small tail must not take the one slot a big piece
# needs); the cuts beyond stay with the shedder. B = 6 candidates are planned at once: keep =
# lam, 3/4 lam, 1/2 lam (keeping less leaves rooms on the over-loaded ranks too, which take the
# last small pieces that would overflow the others' slots), each with rooms largest first and
# smallest first (ties: rank id; on more than one node six more, [Note: rooms dealt over
# nodes] and [Note: grouped rooms] in fssdp/plan_nodes.py); the candidate with the fewest rows
# on its busiest rank wins (on more than one node, counting rows that leave their node too;
# ties: the first). One pass, no loop: O(W E) for the counts, the rest on B (P + W) entries.
# Never worse than the base placement: no rank ends above max(lam, its rows before). Weakest
# with m = 1 (one slot per rank): a room shared by two pieces can keep only one of them.
KEEP = (4, 3, 2, 4, 3, 2)  # keep = lam * KEEP[b] // 4
ROOMS_UP = (0, 0, 0, 1, 1, 1)  # 1: rooms smallest first


@dataclass
class Cuts:
    """The candidates' cuts and what each candidate's ranks end with ([Note: exact mode]),
    as host arrays ([Note: the control plane on the host]).

    A cut is a piece of one shedding pair landing in one room; cuts are listed per piece
    (the cut ending the piece) then per room (the cut ending the room inside a piece)."""

    b_S: np.ndarray  # candidate of each cut
    e_S: np.ndarray  # expert
    u_S: np.ndarray  # receiving rank
    n_S: np.ndarray  # rows (0: no cut, or rejected by the slot cap)
    new_S: np.ndarray  # True when the receiver did not hold the expert (a new replica)
    src_S: np.ndarray  # the shedding rank
    pair_S: np.ndarray  # the shedding pair (index into the base pairs)
    rows_BW: np.ndarray  # rows per rank per candidate, all cuts taken
    base_P: np.ndarray  # rows per base pair before shedding


KEEP4 = np.array(KEEP, dtype=np.int64)
ROOM_SIGN = 1 - 2 * np.array(ROOMS_UP, dtype=np.int64)


@dataclass(frozen=True)
class Candidates:
    """What tells the candidates apart, one entry each (made once: `cut` runs per bank call)."""

    keep4: np.ndarray  # keep = lam * keep4 // 4
    sign: np.ndarray  # 1: rooms largest first; -1: smallest first
    dealt: np.ndarray  # rooms dealt over nodes ([Note: rooms dealt over nodes])
    grouped: np.ndarray  # pieces and rooms node by node ([Note: grouped rooms])

    @staticmethod
    def of(dealt: bool, grouped: bool) -> Candidates:
        no = np.zeros(KEEP4.size, dtype=bool)
        return Candidates(KEEP4, ROOM_SIGN, no | dealt, no | grouped)

    def __add__(self, other: Candidates) -> Candidates:
        both = zip(vars(self).values(), vars(other).values())
        return Candidates(*(np.concatenate([a, b]) for a, b in both))


NODE_BLIND = Candidates.of(False, False)
WITH_DEALT = Candidates.of(True, False) + NODE_BLIND
WITH_GROUPED = Candidates.of(False, True) + Candidates.of(True, False)


def candidates(topology: Topology, grouped: bool = False) -> Candidates:
    """The candidates: on one node the six of [Note: exact mode]; on more, the same six with
    their rooms dealt over nodes first ([Note: rooms dealt over nodes]), then the six
    node-blind ones; with `grouped` the six grouped ones ([Note: grouped rooms] in
    fssdp/plan_nodes.py) take the node-blind ones' place. With one rank per node a deal is the
    size order itself, so the six suffice there too (and a group is one rank)."""
    if topology.num_nodes == 1 or topology.ranks_per_node == 1:
        return NODE_BLIND
    return WITH_GROUPED if grouped else WITH_DEALT


def _check_rows(counts: np.ndarray, total: int) -> None:
    """Counts >= 0 (validated here, once, for plan and assign) and under 2^42 in all."""
    if counts.size and counts.min() < 0:
        s = int(np.flatnonzero((counts < 0).any(1))[0])
        raise ValueError(f"counts_WE[{s}] has a negative count: {counts[s].tolist()}")
    if total >= BIG:
        raise ValueError(f"planner: {total} rows in one bank step is beyond 2^42")


def _base_consts(base: Placement, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank_P * BIG, arange(B P), arange(B W)) for a base placement, cached on it."""
    key = ("plan_exact_host", B)
    if key not in base._cache:
        pr = host(base).rank_P
        base._cache[key] = (pr * BIG, np.arange(B * pr.size), np.arange(B * base.world_size))
    return base._cache[key]


# [Note: rooms dealt over nodes]
# A hot expert's piece fills many consecutive rooms of the line, one copy each. Ordered by size
# alone (ties: rank id) those rooms bunch into a few nodes: one expert's 32 copies on 64 ranks of
# 8 nodes came out 4, 6, 7, 7, 5, 1, 1, 1 per node (the simulator, A100s, skewed). The even
# split then gives each node its holders' share, which the sources of a node with one holder
# do not fill and those of a node with seven overfill, so a quarter of that expert's rows
# crossed nodes. With more than one node six more candidates deal the rooms: each node's rooms
# in the candidate's size order, then round j takes every node's j-th room (in size order among
# them, ties by rank id). Any run of consecutive rooms then spans the nodes evenly (within one),
# so a piece's copies do too and each node computes about its own rows of the expert. Dealing
# can cost balance (a big piece meets small rooms and needs more slots than the capped ranks
# have), so the node-blind candidates stay (on an ownership; [Note: grouped rooms] in
# fssdp/plan_nodes.py for a base with replicas) and the winner is still picked by its busiest
# rank, with the rows it sends across nodes counted too; the dealt ones come before the
# node-blind ones and win their ties. On one node nothing changes.


def room_order(room_BW: np.ndarray, cand: Candidates, topology: Topology) -> np.ndarray:
    """Flat [B W] indices of every candidate's rooms in filling order: by size (largest first
    where cand.sign is 1, smallest first where -1), dealt over nodes where cand.dealt ([Note:
    rooms dealt over nodes]), node by node where cand.grouped ([Note: grouped rooms])."""
    B, W = room_BW.shape
    key_BW = BIG - cand.sign[:, None] * room_BW  # in (0, 2 BIG): rooms are below BIG
    N, R = topology.num_nodes, topology.ranks_per_node
    rounds = 1
    if cand.dealt.any():
        within = np.argsort(key_BW.reshape(B, N, R), axis=2, kind="stable")
        j_BNR = np.argsort(within, axis=2)  # each room's place in its node (the inverse)
        key_BW = (j_BNR.reshape(B, W) * cand.dealt[:, None]) * (2 * BIG) + key_BW
        rounds = R
    if cand.grouped.any():
        node_W = np.arange(W) // R
        key_BW = (node_W[None, :] * cand.grouped[:, None]) * (2 * BIG) + key_BW
        rounds = max(rounds, N)
    off_B = np.arange(B, dtype=np.int64)[:, None] * (rounds * 2 * BIG)
    return np.argsort((off_B + key_BW).ravel(), kind="stable")


def piece_order(
    shed_BP: np.ndarray, r_s: np.ndarray, cand: Candidates, topology: Topology
) -> np.ndarray:
    """Flat [B P] indices of every candidate's pieces on its line: largest first, node by node
    of the shedding rank where cand.grouped ([Note: grouped rooms])."""
    B = shed_BP.shape[0]
    G = topology.num_nodes if cand.grouped.any() else 1
    node_BP = (r_s // topology.ranks_per_node)[None, :] * cand.grouped[:, None]
    key = (np.arange(B, dtype=np.int64)[:, None] * G + node_BP) * (2 * BIG) + BIG - shed_BP
    return np.argsort(key.ravel(), kind="stable")


def cut(
    counts_WE: Tensor,
    base: Placement,
    topology: Topology,
    m: int,
    node_rows_G: np.ndarray | None = None,
) -> Cuts:
    """Every candidate of [Note: exact mode] for counts_WE on top of `base`; given the counts'
    rows per node (`rows_by_node`), from [Note: node-first rows] and with the grouped
    candidates (fssdp/plan_nodes.py) where the base has replicas on more than one node."""
    W = base.world_size
    hb = host(base)
    pe, pr = hb.expert_P, hb.rank_P
    P, owner_only = pe.size, base.is_ownership_only()
    counts = host_array(counts_WE)
    node_first = node_rows_G is not None and not owner_only
    node_first &= topology.num_nodes > 1 and topology.ranks_per_node > 1
    if owner_only:
        q_P = counts.sum(0)
    elif node_first:
        q_P = node_first_rows(node_rows_G, hb, topology)
    else:
        q_P = holder_rows(counts_WE, base, topology)
    load = add_at(W, pr, q_P)
    total = int(q_P.sum())
    _check_rows(counts, total)
    lam = (total + (W - 1)) // W
    cand = candidates(topology, node_first)
    B = cand.keep4.size
    pr_big, ar_BP, ar_BW = _base_consts(base, B)
    order = np.argsort(pr_big - q_P, kind="stable")  # by rank, largest holding first
    q_s, r_s = q_P[order], pr[order]
    lcum = load.cumsum()
    over_s = q_s.cumsum() - (lcum - load)[r_s] - q_s  # my rank's rows before me
    excess_BW = (load - (lam * cand.keep4 // 4)[:, None]) * (load > lam)
    shed_BP = np.maximum(np.minimum(excess_BW[:, r_s] - over_s, q_s), 0)
    shed_W = add_at(B * W, (ar_BW.reshape(B, W)[:, :1] + r_s).ravel(), shed_BP.ravel())
    kept_BW = load - shed_W.reshape(B, W)
    room_BW = np.maximum(lam - kept_BW, 0)
    free_W = None if owner_only else np.maximum(m - hb.replicas_W, 0)
    if free_W is not None:
        room_BW *= free_W > 0
    piece = piece_order(shed_BP, r_s, cand, topology)  # per candidate
    room = room_order(room_BW, cand, topology)
    size = shed_BP.ravel()[piece]
    a_end = size.cumsum()  # candidates end to end; each one's rooms cover its pieces
    tot_B = a_end.reshape(B, P)[:, -1]
    off_B = tot_B - shed_BP.sum(1)
    space = room_BW.ravel()[room].reshape(B, W)
    r_end = np.minimum(space.cumsum(1) + off_B[:, None], tot_B[:, None]).ravel()
    r_len = lengths(r_end)
    c = np.searchsorted(a_end, r_end, side="right")  # pieces ending up to room j's end
    j = np.minimum(np.bincount(c, minlength=a_end.size + 1)[:-1].cumsum(), B * W - 1)
    n_a = np.minimum(size, a_end - (r_end - r_len)[j])
    i = np.minimum(np.searchsorted(a_end, r_end), B * P - 1)
    n_r = np.minimum(r_len, r_end - (a_end - size)[i]) * (r_end < a_end[i])
    ia, ib = np.concatenate([ar_BP, i]), np.concatenate([j, ar_BW])
    n = np.concatenate([n_a, n_r])
    # slot rank of a cut in its room: largest first (a small tail must not take the slot a big
    # piece needs), ties in line order
    by_room = np.argsort(ib * BIG - n, kind="stable")
    k = np.empty_like(by_room)
    k[by_room] = rank_in_runs(ib[by_room])
    ps, u = piece[ia] % P, room[ib] % W
    pair = order[ps]
    e, src, b = pe[pair], r_s[ps], ib // W
    if free_W is None:  # ownership only: a cut into the owner's own room is no move at all
        held = hb.owner_E[e] == u
        n = n * ((k < m) & ~held)
    else:
        held = hb.holders_EW.ravel()[e * W + u]
        n = n * ((k < free_W[u]) | held)  # holders take cuts without a slot
    bw = b * W
    rows_BW = add_at(B * W, np.concatenate([bw + u, bw + src]), np.concatenate([n, -n]))
    return Cuts(b, e, u, n, ~held, src, pair, rows_BW.reshape(B, W) + load, q_P)


def placement_from(
    cuts: Cuts, take_S: np.ndarray, base: Placement, counts_WE: Tensor
) -> Placement:
    """base + the cuts where take_S, with every pair's planned rows."""
    W = base.world_size
    hb = host(base)
    keep = np.flatnonzero(take_S)
    n, pair = cuts.n_S[keep], cuts.pair_S[keep]
    key = np.concatenate([hb.cell_P, cuts.e_S[keep] * W + cuts.u_S[keep]])
    rows = np.concatenate([cuts.base_P - add_at(cuts.base_P.size, pair, n), n])
    if base.is_ownership_only():  # cuts are new pairs, each (expert, rank) once
        order = np.argsort(key)
        key_P, rows_P = key[order], rows[order]
    else:  # a cut may land on a holder, or two shedders' pieces on one rank
        key_P, inv = np.unique(key, return_inverse=True)
        rows_P = add_at(key_P.size, inv, rows)
    return from_cells(base, key_P, PlannedRows(counts_WE, torch.from_numpy(rows_P)))


def plan_exact_t(counts_WE: Tensor, base: Placement, topology: Topology, m: int) -> Placement:
    """[Note: exact mode] on a validated [W, E] count tensor: the candidate with the fewest rows
    on its busiest rank; on more than one node, the fewest rows on its busiest rank plus rows
    leaving their node per node ([Note: grouped rooms] in fssdp/plan_nodes.py); ties: the
    first."""
    N = topology.num_nodes
    c_G = rows_by_node(host_array(counts_WE), topology) if N > 1 else None
    cuts = cut(counts_WE, base, topology, m, c_G)
    cost_B = cuts.rows_BW.max(1)
    if c_G is not None and cost_B.size > 1:
        moves = (cuts.b_S, cuts.e_S, cuts.u_S, cuts.src_S, cuts.n_S)
        short_G = node_shortfall(c_G, host(base), topology, cuts.base_P)
        cross = functools.partial(cross_node_rows, short_G, topology, moves)
        cost_B = cost_B * N
        if cost_B.size * short_G.size <= DENSE_PER_KEY * 2 * cuts.n_S.size:
            cost_B += cross(np.arange(cost_B.size))  # one dense pass over all is cheapest
        else:  # a bound: a candidate whose busiest rank alone is above it cannot win
            first = int(np.argmin(cost_B))
            bound = cost_B[first] + int(cross(np.array([first]))[0])
            rest = np.flatnonzero(cost_B <= bound)
            rest = rest[rest != first]
            cost_B[rest] += cross(rest)
            cost_B[first] = bound
            cost_B[cost_B > bound] = BIG * N  # never evaluated, never the winner
    best = int(np.argmin(cost_B))
    return placement_from(cuts, (cuts.b_S == best) & (cuts.n_S > 0), base, counts_WE)


# [Note: calibration]
# The predicted placement was planned from estimates; once the router has run the true counts
# are known. [Note: exact mode] on top of `predicted` (its replicas count against m, its
# holders take cuts for free) gives each candidate's cuts; taking only the largest k new
# replicas of one (k = all, 1/2, 1/4, 1/8 of them, rounded up; the other cuts stay with their
# shedders) gains (busiest rank's rows before - after) * time_per_row_s on the critical path
# and costs the transfer time of the busiest link: max over ranks of copies sent (owners send)
# or received (new holders receive), times expert_bytes / bandwidth. The variant with the
# largest positive net gain wins (ties: the first); none positive keeps `predicted`.
#
# [Note: re-planning the prefetched slots]
# Building only on top of `predicted` adds nothing once its replicas fill every slot (at
# scale they do: t ≥ m copies are planned for the estimated hot experts, and when the
# estimate was wrong the slots hold the wrong ones; measured in the simulator at 32 A100s,
# skewed: 64 of 64 slots full, calibration 1.04x EP, the same from the owners 4.12x). So the
# candidates are priced twice: on top of `predicted`, and from the owners alone, where a cut
# that lands on a rank already holding the expert by the prefetch costs no copy (it has
# arrived). The re-plan drops the prefetched replicas it does not take (their rows and their
# gradient reduce with them); its gain is measured against the same `before`, the busiest rank
# under `predicted`. Ties keep the extension of `predicted`. The runtime gathers only the
# pairs `predicted` lacks (`Replicas.extend`, fssdp/replicas.py).
FRACTIONS = np.array([8, 4, 2, 1], dtype=np.int64)  # k = ceil(all * f / 8)


@dataclass
class Priced:
    """The best variant of one set of cuts ([Note: calibration]): its net gain in seconds and
    the cuts it takes."""

    net_s: float
    take_S: np.ndarray


def price(
    cuts: Cuts,
    owner_E: np.ndarray,
    before: int,
    copy_s: float,
    time_per_row_s: float,
    arrived_EW: np.ndarray | None = None,
) -> Priced:
    """Every candidate x fraction of `cuts`, net of its busiest link's copies; `arrived_EW`
    marks (expert, rank) cells whose copy is already there (no transfer)."""
    B, W = cuts.rows_BW.shape
    F = FRACTIONS.size
    new = cuts.new_S & (cuts.n_S > 0)
    if arrived_EW is not None:
        new &= ~arrived_EW.ravel()[cuts.e_S * W + cuts.u_S]
    order = np.argsort(cuts.b_S * BIG + (BIG - 1 - cuts.n_S * new), kind="stable")
    pos_S = np.empty_like(order)
    pos_S[order] = rank_in_runs(cuts.b_S[order], new[order])
    k_B = np.bincount(cuts.b_S[new], minlength=B)
    k_BF = (k_B[:, None] * FRACTIONS + 7) // 8
    take_SF = ~new[:, None] | (pos_S[:, None] < k_BF[cuts.b_S])
    drop_FS = (cuts.n_S[:, None] * ~take_SF).T  # rows that stay with the shedder
    v = cuts.b_S * W  # candidate-major flat rank index
    f_off = (np.arange(F) * (B * W))[:, None]
    moved = np.concatenate([f_off + v + cuts.u_S, f_off + v + cuts.src_S], 1).ravel()
    rows = np.tile(cuts.rows_BW.ravel(), F) + add_at(
        F * B * W, moved, np.concatenate([-drop_FS, drop_FS], 1).ravel()
    )
    gain = (before - rows.reshape(F, B, W).max(2)) * time_per_row_s
    ones_FS = (take_SF & new[:, None]).T
    sent = np.bincount((f_off + v + owner_E[cuts.e_S])[ones_FS], minlength=F * B * W)
    recv = np.bincount((f_off + v + cuts.u_S)[ones_FS], minlength=F * B * W)
    links = np.maximum(sent.reshape(F, B, W).max(2), recv.reshape(F, B, W).max(2))
    net = (gain - links * copy_s).T.ravel()  # [B * F]
    best = int(np.argmax(net))
    b, f = divmod(best, F)
    return Priced(float(net[best]), (cuts.b_S == b) & take_SF[:, f] & (cuts.n_S > 0))


def calibrate_t(
    predicted: Placement,
    counts_WE: Tensor,
    topology: Topology,
    m: int,
    expert_bytes: int,
    bandwidth_bytes_per_s: float,
    time_per_row_s: float,
) -> Placement:
    """[Note: calibration] on a validated [W, E] count tensor, with [Note: re-planning the
    prefetched slots]: the result may drop replicas of `predicted`."""
    copy_s = expert_bytes / bandwidth_bytes_per_s
    cuts = cut(counts_WE, predicted, topology, m)
    W = predicted.world_size
    before = int(add_at(W, host(predicted).rank_P, cuts.base_P).max())
    best = price(cuts, host(predicted).owner_E, before, copy_s, time_per_row_s)
    base = predicted
    if not predicted.is_ownership_only():
        own = predicted.ownership()
        cuts_own = cut(counts_WE, own, topology, m)
        arrived = host(predicted).holders_EW
        replan = price(cuts_own, host(own).owner_E, before, copy_s, time_per_row_s, arrived)
        if replan.net_s > best.net_s:
            best, cuts, base = replan, cuts_own, own
    if not best.net_s > 0:
        return predicted
    return placement_from(cuts, best.take_S, base, counts_WE)
