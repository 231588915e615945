"""Who sends which expert to whom, in which round; and the alpha-beta cost of such a schedule.

Legend: a transfer is (e, src, dst): expert e's row moves from rank src to rank dst. E experts,
W ranks, N new holder pairs, M transfers, R rounds. A `Schedule` holds `xfer_M3` (int64 array of
rows (e, src, dst), grouped by round) and `offsets` (R + 1 ints: round k is rows offsets[k] to
offsets[k + 1]). Pairs (e, r) are keyed e * W + r. Builders are array code over the
placements' holder pairs, a pure function of the placements, so every rank computes the same
schedule with no messages.

# [Note: schedules as arrays]
Schedules are built per bank per step, at W up to 1024: one set difference of sorted pair keys
(through an E * W bit mask), two sorts and a few elementwise ops, never a Python loop over experts
or ranks. They are host metadata of a few thousand integers, so they are numpy arrays (an op
costs ~1-3 us there against ~5-25 us for a CPU torch op; both are exact integer arithmetic).
Each rank then extracts its own part once (`Schedule.for_rank`, cached), which is small (what it
sends and receives). Iterating a Schedule yields its rounds as lists of (e, src, dst) tuples, and
a Schedule compares equal to such a list of lists, for tests and for reading.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from collectives.comm import CommStats
from collectives.placement import Placement, Topology

Transfer = tuple[int, int, int]  # (expert, src rank, dst rank)
Message = tuple[int, tuple[int, ...]]  # (peer rank, experts ascending)


@dataclass(frozen=True)
class CostModel:
    """Latencies of the alpha-beta cost rule, in bytes: what the busiest link moves in that time
    (alpha / beta), so only the ratio to bandwidth matters.

    # [Note: calibrated defaults]
    `probe_cost_model(group)` measures both on the group at hand: one tiny message rank 0 ->
    rank 1 by all_to_all_single and by a point-to-point round, and the bandwidth of a 4 MiB one.
    The defaults are its readings on gloo over loopback, one thread per rank, rounded down (W=2:
    1.04 MB per a2a peer, 0.83 MB per round; W=4: 1.57 MB, 1.15 MB; perf/results/
    bench_collectives.json, "calibration"). gloo's all_to_all_single syncs every pair, even
    empty ones, so on gloo a one-round point-to-point schedule beats it; the same run scores
    the rule against the measured-faster algorithm ("rule"). Other fabrics differ (NCCL skips
    empty pairs): calibrate there rather than trust these.
    """

    a2a_peer_bytes: float = 1_000_000
    round_bytes: float = 800_000


DEFAULT_COST = CostModel()


# -- placements as arrays ---------------------------------------------------------------------


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.int64, copy=False)


def pair_keys(p: Placement) -> np.ndarray:
    """Sorted keys e * W + r of every holder pair (e, r) of `p`, int64.

    Uses the placement's own pair arrays when it has them (`pairs_P()`, the tensor-backed
    placement: sorted by expert, then rank), else builds them from `holders` once.
    """
    W = p.world_size
    fast = getattr(p, "pairs_P", None)
    if callable(fast):
        pe, pr = fast()
        if isinstance(pe, torch.Tensor) and isinstance(pr, torch.Tensor) and pe.shape == pr.shape:
            return _np64(pe) * W + _np64(pr)
    return pair_keys_from_holders(p)


def pair_keys_from_holders(p: Placement) -> np.ndarray:
    W = p.world_size
    keys = [e * W + r for e, hs in enumerate(p.holders) for r in sorted(hs)]
    return np.array(keys, dtype=np.int64)


def owners(p: Placement) -> np.ndarray:
    """Int64 [E]: the owner rank of each expert."""
    fast = getattr(p, "owner_E", None)
    if isinstance(fast, torch.Tensor) and tuple(fast.shape) == (p.num_experts,):
        return _np64(fast)
    return np.array(p.owner, dtype=np.int64).reshape(p.num_experts)


@dataclass(frozen=True)
class Diff:
    """The holder pairs `big` adds to `small` (spAG direction), sorted by expert then rank:
    expert_N, rank_N, and the owner of each, owner_N."""

    num_experts: int
    world_size: int
    expert_N: np.ndarray
    rank_N: np.ndarray
    owner_N: np.ndarray

    @staticmethod
    def of(small: Placement, big: Placement) -> Diff:
        E, W = big.num_experts, big.world_size
        big_P = pair_keys(big)
        in_small = np.zeros(E * W, dtype=bool)  # E * W bits: 256 KB at E=256, W=1024
        in_small[pair_keys(small)] = True
        new_N = big_P[~in_small[big_P]]  # sorted, as big_P is
        e_N = new_N // W
        return Diff(E, W, e_N, new_N % W, owners(big)[e_N])


# -- the schedule object ----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundView:
    """One rank's part of one round: messages it sends and receives, peers ascending."""

    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]


@dataclass(frozen=True)
class RankView:
    """One rank's part of a schedule: a RoundView per round (empty where it sits out)."""

    rounds: tuple[RoundView, ...]
    sent: int  # rows this rank sends, all rounds
    recv: int  # rows it receives

    def stats(self, row_bytes: int) -> CommStats:
        return CommStats(self.sent * row_bytes, self.recv * row_bytes)


def _offsets(sizes: Iterable[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + int(n))
    return out


class Schedule:
    """Rounds of transfers that run concurrently, round after round (see module legend)."""

    __slots__ = ("xfer_M3", "offsets", "_round_M", "_views", "_rev")

    def __init__(self, xfer_M3: np.ndarray, offsets: list[int]) -> None:
        xfer_M3 = np.asarray(xfer_M3, dtype=np.int64).reshape(-1, 3)
        if offsets[0] != 0 or offsets[-1] != xfer_M3.shape[0]:
            raise ValueError(f"Schedule: offsets {offsets} do not cover {xfer_M3.shape[0]} rows")
        self.xfer_M3, self.offsets = xfer_M3, offsets
        self._round_M: np.ndarray | None = None
        self._views: dict[int, RankView] = {}
        self._rev: Schedule | None = None

    @staticmethod
    def empty() -> Schedule:
        return Schedule(np.zeros((0, 3), dtype=np.int64), [0])

    @staticmethod
    def from_rounds(rounds: Iterable[Iterable[Transfer]]) -> Schedule:
        rows: list[Transfer] = []
        sizes: list[int] = []
        for rnd in rounds:
            got = [tuple(t) for t in rnd]
            rows.extend(got)  # type: ignore[arg-type]
            sizes.append(len(got))
        return Schedule(np.array(rows, dtype=np.int64).reshape(-1, 3), _offsets(sizes))

    @staticmethod
    def from_round_index(xfer_M3: np.ndarray, round_M: np.ndarray) -> Schedule:
        """Rows already sorted by round; round_M their round numbers (0-based, no gaps)."""
        if not round_M.size:
            return Schedule.empty()
        return Schedule(xfer_M3, _offsets(np.bincount(round_M).tolist()))

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_transfers(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, k: int) -> list[Transfer]:
        k = range(len(self))[k]
        rows = self.xfer_M3[self.offsets[k] : self.offsets[k + 1]].tolist()
        return [tuple(t) for t in rows]  # type: ignore[misc]

    def __iter__(self) -> Iterator[list[Transfer]]:
        return iter(self.to_list())

    def to_list(self) -> list[list[Transfer]]:
        flat = [tuple(t) for t in self.xfer_M3.tolist()]
        return [flat[a:b] for a, b in zip(self.offsets, self.offsets[1:])]  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Schedule):
            return self.offsets == other.offsets and np.array_equal(self.xfer_M3, other.xfer_M3)
        if isinstance(other, list):
            return self.to_list() == [[tuple(t) for t in rnd] for rnd in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Schedule({self.to_list()})"

    @property
    def round_M(self) -> np.ndarray:
        if self._round_M is None:
            self._round_M = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))
        return self._round_M

    # -- derived schedules, cost, per-rank parts ---------------------------------------------
    def reversed(self) -> Schedule:
        """spRS runs the spAG schedule backwards: rounds reversed, src and dst swapped, the
        order inside each round kept."""
        if self._rev is None:
            order = np.argsort(len(self) - 1 - self.round_M, kind="stable")
            rev = Schedule(self.xfer_M3[order][:, [0, 2, 1]], _offsets(np.diff(self.offsets)[::-1]))
            rev._rev, self._rev = self, rev
        return self._rev

    def cost(self, expert_bytes: int, latency_bytes: float) -> float:
        """Alpha-beta cost in bytes: per non-empty round, latency + the busiest rank's send or
        receive bytes."""
        if not self.num_transfers:
            return 0.0
        R, W = len(self), int(self.xfer_M3[:, 1:].max()) + 1
        r = self.round_M * W
        sent = np.bincount(r + self.xfer_M3[:, 1], minlength=R * W).reshape(R, W).max(1)
        recv = np.bincount(r + self.xfer_M3[:, 2], minlength=R * W).reshape(R, W).max(1)
        cost = 0.0
        for busiest in np.maximum(sent, recv).tolist():
            if busiest:
                cost += latency_bytes + expert_bytes * busiest
        return cost

    def for_rank(self, rank: int) -> RankView:
        """This rank's sends and receives, round by round (computed once per rank)."""
        if rank not in self._views:
            self._views[rank] = self._view(rank)
        return self._views[rank]

    def _view(self, rank: int) -> RankView:
        x = self.xfer_M3
        sel = np.flatnonzero((x[:, 1] == rank) | (x[:, 2] == rank))
        sends: list[dict[int, list[int]]] = [{} for _ in range(len(self))]
        recvs: list[dict[int, list[int]]] = [{} for _ in range(len(self))]
        n_sent = n_recv = 0
        for (e, s, d), k in zip(x[sel].tolist(), self.round_M[sel].tolist()):
            if s == rank:
                sends[k].setdefault(d, []).append(e)
                n_sent += 1
            if d == rank:
                recvs[k].setdefault(s, []).append(e)
                n_recv += 1

        def msgs(by_peer: dict[int, list[int]]) -> tuple[Message, ...]:
            return tuple((p, tuple(sorted(by_peer[p]))) for p in sorted(by_peer))

        rounds = tuple(RoundView(msgs(s), msgs(r)) for s, r in zip(sends, recvs))
        return RankView(rounds, n_sent, n_recv)


# -- builders ---------------------------------------------------------------------------------


def direct_from(d: Diff) -> Schedule:
    """One round: the owner sends to every new holder (spAG direction)."""
    n = int(d.expert_N.size)
    if not n:
        return Schedule.empty()
    return Schedule(np.stack([d.expert_N, d.owner_N, d.rank_N], 1), [0, n])


@functools.lru_cache(maxsize=8)
def _bit_lengths(n: int) -> np.ndarray:
    """[n + 1] table: entry x is x.bit_length()."""
    return np.array([x.bit_length() for x in range(n + 1)], dtype=np.int64)


def _binomial(g: np.ndarray, r: np.ndarray, root_N: np.ndarray, G: int, W: int) -> tuple:
    """[Note: binomial relay]'s closed form for groups g (members sorted by group, in tree
    order; root_N each member's group root): (sender, round, sender's place in L) of every
    member. L[j] (j >= 1) receives from L[j - low(j)] in round R - 1 - ctz(j)."""
    cnt = np.bincount(g, minlength=G)
    start = np.cumsum(cnt) - cnt
    pos = np.arange(g.size, dtype=np.int64) - start[g] + 1  # place in L; the root is 0
    low = pos & -pos
    bits = _bit_lengths(W)  # pos, low and counts are all <= W - 1
    src_pos = pos - low
    src = np.where(src_pos == 0, root_N, r[np.maximum(start[g] + src_pos - 1, 0)])
    return src, bits[cnt[g]] - bits[low], src_pos


def tree_from(d: Diff, topo: Topology | None = None) -> Schedule:
    """Per-expert binomial broadcast trees run side by side (spAG direction).

    # [Note: binomial relay]
    For expert e with order L = [owner, d1, d2, ...] (n = len(L)) and R = ceil(log2 n) rounds,
    round k uses stride 2^(R-1-k): every L[i] with i a multiple of 2*stride (it already has e)
    sends to L[i + stride]. Far halves are served first (recursive halving), so when L lists each
    node's ranks contiguously, only the first hops cross nodes. No rank sends more than one copy
    of e per round, so a hot expert's owner is no longer the bottleneck; an expert with one new
    holder takes a single round, exactly as in the direct schedule. Closed form used here: L[j]
    (j >= 1) receives from L[j - low(j)] in round R - 1 - ctz(j), low(j) = j's lowest set bit.

    L after the owner sorts the new holders by cyclic distance from the owner, which spreads
    the first hops of different owners over different receivers; with a topology, by (node
    distance, rank distance), so each node's ranks are contiguous and a tree crosses each node
    boundary once.
    """
    E, W = d.num_experts, d.world_size
    e, r, o = d.expert_N, d.rank_N, d.owner_N
    if not e.size:
        return Schedule.empty()
    key = (r - o) % W
    span = W
    if topo is not None:
        if int(r.max()) >= topo.world_size:
            raise ValueError(f"Topology: rank {int(r.max())} out of range [0, {topo.world_size})")
        n_nodes, rpn = topo.num_nodes, topo.ranks_per_node
        key = ((r // rpn - o // rpn) % n_nodes) * W + key
        span = n_nodes * W
    order = np.argsort(e * span + key)  # keys are unique: no stability needed
    e, r, o = e[order], r[order], o[order]
    src, rnd, src_pos = _binomial(e, r, o, E, W)
    # Within a round: by expert, then by sender's place in L (the order of the loop it replaces).
    order = np.argsort((rnd * E + e) * W + src_pos)
    xfer = np.stack([e, src, r], 1)[order]
    return Schedule.from_round_index(xfer, rnd[order])


def tree_nodes_from(d: Diff, topo: Topology | None = None) -> Schedule:
    """Binomial trees over one relay per node, then inside each node (spAG direction).

    # [Note: node relays]
    The binomial tree of [Note: binomial relay] serves far halves first, so an owner whose node
    has few new holders sends one copy across nodes per round (an expert for the 4 ranks of
    another node crosses the NIC 3 times). Here each expert's copies cross nodes once per
    receiving node: stage 1 is a binomial tree over the owner and one relay per other node with
    new holders (the first of them by cyclic rank distance from the owner); stage 2, from round
    R1 on (R1 = stage 1's rounds), a binomial tree inside every node from its relay (the owner
    in its own node) to the node's other new holders. On one node, or without a topology, it
    is `tree_from`'s schedule.
    """
    if topo is None or topo.num_nodes == 1 or not d.expert_N.size:
        return tree_from(d, topo)
    E, W, N, R = d.num_experts, d.world_size, topo.num_nodes, topo.ranks_per_node
    if int(d.rank_N.max()) >= topo.world_size:
        raise ValueError(f"Topology: rank {int(d.rank_N.max())} out of range [0, {W})")
    e, r, o = d.expert_N, d.rank_N, d.owner_N
    order = np.argsort((e * N + (r // R - o // R) % N) * W + (r - o) % W)
    e, r, o = e[order], r[order], o[order]
    node, home = r // R, o // R
    group = e * N + node  # contiguous after the sort
    relay = np.r_[True, group[1:] != group[:-1]] & (node != home)
    src1, rnd1, _ = _binomial(e[relay], r[relay], o[relay], E, W)
    stage1 = int(rnd1.max()) + 1 if rnd1.size else 0
    rest = ~relay
    relay_of = np.full(E * N, -1, dtype=np.int64)
    relay_of[group[relay]] = r[relay]
    g2 = group[rest]
    root = np.where(node[rest] == home[rest], o[rest], relay_of[g2])
    inv = np.cumsum(np.r_[True, g2[1:] != g2[:-1]]) - 1 if g2.size else g2  # in sort order
    src2, rnd2, _ = _binomial(inv, r[rest], root, int(inv.max()) + 1 if inv.size else 0, W)
    xe = np.concatenate([e[relay], e[rest]])
    xs = np.concatenate([src1, src2])
    xd = np.concatenate([r[relay], r[rest]])
    xr = np.concatenate([rnd1, rnd2 + stage1])
    by = np.lexsort((xd, xs, xe, xr))  # round, then expert, sender, receiver
    return Schedule.from_round_index(np.stack([xe, xs, xd], 1)[by], xr[by])


def direct_schedule(small: Placement, big: Placement) -> Schedule:
    return direct_from(Diff.of(small, big))


def tree_schedule(small: Placement, big: Placement, topo: Topology | None = None) -> Schedule:
    """See [Note: binomial relay] in `tree_from`."""
    return tree_from(Diff.of(small, big), topo)


def reverse_schedule(sched: Schedule | Iterable[Iterable[Transfer]]) -> Schedule:
    """spRS runs the spAG schedule backwards: rounds reversed, src and dst swapped."""
    s = sched if isinstance(sched, Schedule) else Schedule.from_rounds(sched)
    return s.reversed()


def schedule_cost(
    sched: Schedule | Iterable[Iterable[Transfer]], expert_bytes: int, latency_bytes: float
) -> float:
    """Alpha-beta cost in bytes: per round, latency + the busiest rank's send or receive bytes."""
    s = sched if isinstance(sched, Schedule) else Schedule.from_rounds(sched)
    return s.cost(expert_bytes, latency_bytes)


# -- argument checks --------------------------------------------------------------------------


def _same_bank(a: Placement, b: Placement) -> None:
    if (a.num_experts, a.world_size) != (b.num_experts, b.world_size):
        raise ValueError(
            f"placements describe different banks: E={a.num_experts}, W={a.world_size} vs "
            f"E={b.num_experts}, W={b.world_size}"
        )
    if a.owner != b.owner:
        diff = [e for e in range(a.num_experts) if a.owner[e] != b.owner[e]]
        raise ValueError(f"placements disagree on the owner of experts {diff[:8]}")


def check_gather(pf: Placement, pt: Placement) -> None:
    """spAG(pf -> pt) needs the same owners and pf ⊆ pt."""
    _same_bank(pf, pt)
    if not pf.is_subset_of(pt):
        missing = pf.extra_pairs(pt)[:8]
        raise ValueError(
            f"sparse_all_gather needs placement_from ⊆ placement_to; {missing} are not"
        )


def check_reduce(pf: Placement, pt: Placement) -> None:
    """spRS(pf -> pt) needs the same owners and pt = ownership only."""
    _same_bank(pf, pt)
    if not pt.is_ownership_only():
        raise ValueError(
            "sparse_reduce_scatter needs placement_to = ownership only (no replicas); "
            f"replica counts {pt.num_replicas()}"
        )
