"""Exact placement (after routing) and calibration: replicas and their rows, in one go.

Legend: W ranks, E experts, P holder pairs of the base placement, B candidate plans, S
overlaps (candidate replicas with their rows), lam the target rows per rank (the mean, rounded
up). Integer tensor code on the counts' device; ties break by expert id, then rank id, so every
rank plans the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from collectives.placement import Placement, PlannedRows, Topology
from fssdp.quotas import holder_rows, load_W
from fssdp.segments import rank_in_runs

I64 = torch.int64
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
# smallest first (ties: rank id); the candidate with the fewest rows on its busiest rank wins
# (ties: the first). One pass, no loop: O(W E) for the counts, the rest on B (P + W) entries.
# Never worse than the base placement: no rank ends above max(lam, its rows before). Weakest
# with m = 1 (one slot per rank): a room shared by two pieces can keep only one of them.
KEEP = (4, 3, 2, 4, 3, 2)  # keep = lam * KEEP[b] // 4
ROOMS_UP = (0, 0, 0, 1, 1, 1)  # 1: rooms smallest first


@dataclass
class Cuts:
    """The candidates' cuts and what each candidate's ranks end with ([Note: exact mode]).

    A cut is a piece of one shedding pair landing in one room; cuts are listed per piece
    (the cut ending the piece) then per room (the cut ending the room inside a piece)."""

    b_S: Tensor  # candidate of each cut
    e_S: Tensor  # expert
    u_S: Tensor  # receiving rank
    n_S: Tensor  # rows (0: no cut, or rejected by the slot cap)
    new_S: Tensor  # True when the receiver did not hold the expert (a new replica)
    src_S: Tensor  # the shedding rank
    pair_S: Tensor  # the shedding pair (index into the base pairs)
    rows_BW: Tensor  # rows per rank per candidate, all cuts taken
    base_P: Tensor  # rows per base pair before shedding


_CONSTS: dict[str, tuple[Tensor, Tensor, Tensor]] = {}


def _consts(dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(KEEP numerators [B], candidate offsets [B, 1]) on `dev`, made once per device."""
    key = str(dev)
    if key not in _CONSTS:
        keep = torch.tensor(KEEP, dtype=I64, device=dev)
        sign = 1 - 2 * torch.tensor(ROOMS_UP, dtype=I64, device=dev)[:, None]
        _CONSTS[key] = (keep, (torch.arange(len(KEEP), device=dev)[:, None] * 2 + 1) * BIG, sign)
    return _CONSTS[key]


def _check_rows(counts_WE: Tensor, total: Tensor) -> None:
    """Counts >= 0 (validated here, once, for plan and assign) and under 2^42 in all."""
    lo, tot = torch.stack([counts_WE.min(), total]).tolist()
    if lo < 0:
        s = int(torch.nonzero((counts_WE < 0).any(1))[0])
        raise ValueError(f"counts_WE[{s}] has a negative count: {counts_WE[s].tolist()}")
    if tot >= BIG:
        raise ValueError(f"planner: {tot} rows in one bank step is beyond 2^42")


def _base_consts(base: Placement, B: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rank_P * BIG, arange(B P), arange(B W)) for a base placement, cached on it."""
    key = ("plan_exact", B)
    if key not in base._cache:
        pe, pr = base.pairs_P()
        dev = pe.device
        base._cache[key] = (
            pr * BIG,
            torch.arange(B * pe.numel(), device=dev),
            torch.arange(B * base.world_size, device=dev),
        )
    return base._cache[key]


def cut(counts_WE: Tensor, base: Placement, topology: Topology, m: int) -> Cuts:
    """Every candidate of [Note: exact mode] for counts_WE on top of `base`."""
    W, dev = base.world_size, counts_WE.device
    pe, pr = base.pairs_P()
    P, owner_only = pe.numel(), base.is_ownership_only()
    q_P = counts_WE.sum(0) if owner_only else holder_rows(counts_WE, base, topology)
    load = torch.zeros(W, dtype=I64, device=dev).index_add_(0, pr, q_P)
    total = q_P.sum()
    _check_rows(counts_WE, total)
    lam = (total + (W - 1)) // W
    keep4, boff, sign = _consts(dev)
    B = keep4.numel()
    pr_big, ar_BP, ar_BW = _base_consts(base, B)
    order = torch.argsort(pr_big - q_P, stable=True)  # by rank, largest holding first
    q_s, r_s = q_P.index_select(0, order), pr.index_select(0, order)
    lcum = load.cumsum(0)
    over_s = q_s.cumsum(0) - (lcum - load).index_select(0, r_s) - q_s  # my rank's rows before me
    excess_BW = (load - (lam * keep4 // 4)[:, None]) * (load > lam)
    shed_BP = torch.minimum(excess_BW.index_select(1, r_s) - over_s, q_s).clamp_(min=0)
    kept_BW = load - torch.zeros_like(excess_BW).index_add_(1, r_s, shed_BP)
    room_BW = (lam - kept_BW).clamp_(min=0)
    free_W = None if owner_only else (m - base.replicas_W()).clamp_(min=0)
    if free_W is not None:
        room_BW *= free_W > 0
    piece = torch.argsort((boff - shed_BP).view(-1), stable=True)  # largest first, per candidate
    room = torch.argsort((boff - sign * room_BW).view(-1), stable=True)
    size = shed_BP.view(-1).index_select(0, piece)
    a_end = size.cumsum(0)  # candidates end to end; each one's rooms cover its pieces
    tot_B = a_end.view(B, P)[:, -1]
    off_B = tot_B - shed_BP.sum(1)
    space = room_BW.view(-1).index_select(0, room).view(B, W)
    r_end = torch.minimum(space.cumsum(1) + off_B[:, None], tot_B[:, None]).view(-1)
    r_len = r_end - torch.nn.functional.pad(r_end[:-1], (1, 0))
    c = torch.searchsorted(a_end, r_end, right=True)  # pieces ending up to room j's end
    j = torch.bincount(c, minlength=a_end.numel() + 1)[:-1].cumsum_(0).clamp_(max=B * W - 1)
    n_a = torch.minimum(size, a_end - (r_end - r_len).index_select(0, j))
    i = torch.searchsorted(a_end, r_end).clamp_(max=B * P - 1)
    n_r = torch.minimum(r_len, r_end - (a_end - size).index_select(0, i))
    n_r = n_r * (r_end < a_end.index_select(0, i))
    ia, ib = torch.cat([ar_BP, i]), torch.cat([j, ar_BW])
    n = torch.cat([n_a, n_r])
    # slot rank of a cut in its room: largest first (a small tail must not take the slot a big
    # piece needs), ties in line order
    by_room = torch.argsort(ib * BIG - n, stable=True)
    k = torch.empty_like(by_room).index_copy_(0, by_room, rank_in_runs(ib.index_select(0, by_room)))
    ps, u = piece.index_select(0, ia) % P, room.index_select(0, ib) % W
    pair = order.index_select(0, ps)
    e, src, b = pe.index_select(0, pair), r_s.index_select(0, ps), ib // W
    if free_W is None:  # ownership only: a cut into the owner's own room is no move at all
        held = base.owner_E.index_select(0, e) == u
        n = n * ((k < m) & ~held)
    else:
        held = base.holders_EW().view(-1).index_select(0, e * W + u)
        n = n * ((k < free_W.index_select(0, u)) | held)  # holders take cuts without a slot
    rows_BW = torch.zeros(B * W, dtype=I64, device=dev).index_add_(
        0, torch.cat([b * W + u, b * W + src]), torch.cat([n, -n])
    ).view(B, W) + load
    return Cuts(b, e, u, n, ~held, src, pair, rows_BW, q_P)


def placement_from(
    cuts: Cuts, take_S: Tensor, base: Placement, counts_WE: Tensor
) -> Placement:
    """base + the cuts where take_S, with every pair's planned rows."""
    W = base.world_size
    pe, pr = base.pairs_P()
    keep = torch.nonzero(take_S).flatten()
    n, pair = cuts.n_S.index_select(0, keep), cuts.pair_S.index_select(0, keep)
    key_S = cuts.e_S.index_select(0, keep) * W + cuts.u_S.index_select(0, keep)
    key = torch.cat([base.cells_P(), key_S])
    rows = torch.cat([cuts.base_P.index_add(0, pair, -n), n])
    if base.is_ownership_only():  # cuts are new pairs, each (expert, rank) once
        key_P, order = torch.sort(key)
        rows_P = rows.index_select(0, order)
    else:  # a cut may land on a holder, or two shedders' pieces on one rank
        key_P, inv = torch.unique(key, return_inverse=True)
        rows_P = torch.zeros_like(key_P).index_add_(0, inv, rows)
    planned = PlannedRows(counts_WE, rows_P)
    return Placement._trusted(base.owner_E, key_P // W, key_P % W, W, planned, key_P)


def plan_exact_t(counts_WE: Tensor, base: Placement, topology: Topology, m: int) -> Placement:
    """[Note: exact mode] on a validated [W, E] count tensor."""
    cuts = cut(counts_WE, base, topology, m)
    best = torch.argmin(cuts.rows_BW.max(1).values)  # first of the lowest busiest rank
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
FRACTIONS = (8, 4, 2, 1)  # k = ceil(all * f / 8)


@dataclass
class Priced:
    """The best variant of one set of cuts ([Note: calibration]): its net gain in seconds and
    the cuts it takes."""

    net_s: float
    take_S: Tensor


def price(
    cuts: Cuts,
    owner_E: Tensor,
    before: Tensor,
    copy_s: float,
    time_per_row_s: float,
    arrived_EW: Tensor | None = None,
) -> Priced:
    """Every candidate x fraction of `cuts`, net of its busiest link's copies; `arrived_EW`
    marks (expert, rank) cells whose copy is already there (no transfer)."""
    W = int(cuts.rows_BW.shape[1])
    dev = cuts.n_S.device
    B, F = cuts.rows_BW.shape[0], len(FRACTIONS)
    new = cuts.new_S & (cuts.n_S > 0)
    if arrived_EW is not None:
        new &= ~arrived_EW.view(-1).index_select(0, cuts.e_S * W + cuts.u_S)
    order = torch.argsort(cuts.b_S * BIG + (BIG - 1 - cuts.n_S * new), stable=True)
    pos_S = torch.empty_like(order).index_copy_(0, order, rank_in_runs(cuts.b_S[order], new[order]))
    k_B = torch.zeros(B, dtype=I64, device=dev).index_add_(0, cuts.b_S, new.to(I64))
    f_F = torch.tensor(FRACTIONS, dtype=I64, device=dev)
    k_BF = (k_B[:, None] * f_F + 7) // 8
    take_SF = ~new[:, None] | (pos_S[:, None] < k_BF[cuts.b_S])
    drop_SF = (cuts.n_S[:, None] * ~take_SF).T  # [F, S] rows that stay with the shedder
    v = cuts.b_S * W  # candidate-major flat rank index
    rows = cuts.rows_BW.flatten().repeat(F, 1)
    rows.index_add_(1, v + cuts.u_S, -drop_SF).index_add_(1, v + cuts.src_S, drop_SF)
    gain = (before - rows.view(F, B, W).max(2).values) * time_per_row_s
    sent = torch.zeros(F, B * W, dtype=I64, device=dev)
    recv = torch.zeros(F, B * W, dtype=I64, device=dev)
    ones = (take_SF & new[:, None]).T.to(I64)
    sent.index_add_(1, v + owner_E[cuts.e_S], ones)
    recv.index_add_(1, v + cuts.u_S, ones)
    links = torch.maximum(sent.view(F, B, W).max(2).values, recv.view(F, B, W).max(2).values)
    net = (gain - links * copy_s).T.flatten()  # [B * F]
    best = int(torch.argmax(net))
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
    before = load_W(cuts.base_P, predicted.pairs_P()[1], W).max()
    best = price(cuts, predicted.owner_E, before, copy_s, time_per_row_s)
    base = predicted
    if not predicted.is_ownership_only():
        own = predicted.ownership()
        cuts_own = cut(counts_WE, own, topology, m)
        arrived = predicted.holders_EW()
        replan = price(cuts_own, own.owner_E, before, copy_s, time_per_row_s, arrived)
        if replan.net_s > best.net_s:
            best, cuts, base = replan, cuts_own, own
    if not best.net_s > 0:
        return predicted
    return placement_from(cuts, best.take_S, base, counts_WE)
