"""Per bank, per iteration: which experts to materialize where.

Legend: W ranks, E experts, t the overlap degree (expert copies one rank can receive while the
transfer hides behind other work), m the memory cap (extra expert slots per rank, i.e. replicas a
rank may hold beyond the experts it owns). A placement returned here always contains the one it
started from (owners unchanged, replicas only added).

All functions are pure and deterministic: every rank calls them with the same inputs and gets the
same placement, so no rank has to broadcast its plan. Ties break by expert id, then rank id.


Today's pre-vectorisation planner (fssdp/planner.py at commit f334c87),
copied from git ONLY for the benchmark (perf/bench_planner.py) and as a reference in tests;
the runtime uses fssdp.planner / fssdp.assign.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from collectives.placement import Placement, Topology
from perf.assign_v1 import as_count_matrix, holder_quotas


def _as_floats(x: Any) -> list[float]:
    return [float(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]


# -- load estimate ---------------------------------------------------------------------------


class LoadEstimator:
    """Sliding-window mean of the last `window` iterations' global token counts per expert."""

    def __init__(self, num_experts: int, window: int = 5) -> None:
        if num_experts < 0 or window < 1:
            raise ValueError(
                f"LoadEstimator: need num_experts >= 0 and window >= 1, got {num_experts}, {window}"
            )
        self.num_experts = num_experts
        self.window = window
        self._history: deque[list[float]] = deque(maxlen=window)

    def update(self, counts_E: Any) -> None:
        counts = _as_floats(counts_E)
        if len(counts) != self.num_experts:
            raise ValueError(
                f"LoadEstimator.update: got {len(counts)} counts, expected E={self.num_experts}"
            )
        self._history.append(counts)

    def estimate(self) -> list[float]:
        """Mean per expert over the window; all 1.0 (uniform) before the first update."""
        if not self._history:
            return [1.0] * self.num_experts
        n = len(self._history)
        return [sum(col) / n for col in zip(*self._history)]

    def state_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "window": self.window,
            "history": [list(h) for h in self._history],
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_experts"] != self.num_experts:
            raise ValueError(
                f"LoadEstimator.load_state_dict: checkpoint has E={sd['num_experts']}, "
                f"this bank has E={self.num_experts}"
            )
        self._history.clear()
        for counts in sd["history"][-self.window :]:
            self.update(counts)


def overlap_degree(
    overlap_time_s: float, bandwidth_bytes_per_s: float, expert_bytes: int, num_experts: int
) -> int:
    """t = floor(T_overlap * bandwidth / S_e), clamped to [0, num_experts]."""
    if expert_bytes <= 0:
        raise ValueError(f"overlap_degree: expert_bytes must be > 0, got {expert_bytes}")
    copies = overlap_time_s * bandwidth_bytes_per_s / expert_bytes
    if math.isnan(copies) or copies <= 0:
        return 0
    return num_experts if math.isinf(copies) else max(0, min(num_experts, math.floor(copies)))


# -- predicted placement ---------------------------------------------------------------------


def free_slots(placement: Placement, m: int) -> list[int]:
    """Per rank: m minus the replicas (held, not owned) it already has; never below 0."""
    used = [0] * placement.world_size
    for e, hs in enumerate(placement.holders):
        for r in hs:
            used[r] += r != placement.owner[e]
    return [max(0, m - u) for u in used]


def _top(load_E: list[float], t: int) -> list[int]:
    """The t heaviest experts (ties by id) that carry any load: replicating idle ones is waste."""
    order = sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[:t]
    return [e for e in order if load_E[e] > 0]


# [Note: proportional slots, nodes first]
# With t > m the |D|·m slots are dealt one at a time, D'Hondt style: the next slot goes to the
# top-t expert with the largest load per copy, load_e / |holders_e| (ties: expert id), which
# hands experts copies in proportion to their load and always relieves the currently worst
# per-copy share. The slot lands on the rank that (1) has a free slot and lacks the expert,
# (2) sits in the node holding the fewest copies of it (nodes that lack it first, so tokens stay
# in their node), (3) has the least planned load, Σ over experts it holds of load_e / |holders_e|
# (the even split; assign_tokens may level further, never worse), (4) has the most free slots,
# (5) lowest id. An expert
# that no rank can take (all hold it, or every rank with room has it) leaves the deal; slots
# nobody can use stay unused.


def _rank_loads(placement: Placement, load_E: list[float]) -> list[float]:
    loads = [0.0] * placement.world_size
    for e, hs in enumerate(placement.holders):
        for r in sorted(hs):
            loads[r] += load_E[e] / len(hs)
    return loads


def _deal_slots(
    load_E: list[float], top: list[int], base: Placement, topology: Topology, m: int
) -> dict[int, list[int]]:
    """Replicas per expert per [Note: proportional slots, nodes first]."""
    W = base.world_size
    holders = [set(hs) for hs in base.holders]
    free = free_slots(base, m)
    rank_load = _rank_loads(base, load_E)
    added: dict[int, list[int]] = {}
    heap = [(-load_E[e] / len(holders[e]), e) for e in top]
    heapq.heapify(heap)
    while heap and any(free):
        _, e = heapq.heappop(heap)
        node_copies = [0] * topology.num_nodes
        for h in holders[e]:
            node_copies[topology.node_of(h)] += 1
        cands = [r for r in range(W) if free[r] and r not in holders[e]]
        if not cands:
            continue  # nobody can take e any more
        r = min(cands, key=lambda r: (node_copies[topology.node_of(r)], rank_load[r], -free[r], r))
        old, new = load_E[e] / len(holders[e]), load_E[e] / (len(holders[e]) + 1)
        for h in holders[e]:
            rank_load[h] += new - old
        rank_load[r] += new
        holders[e].add(r)
        free[r] -= 1
        added.setdefault(e, []).append(r)
        if len(holders[e]) < W:
            heapq.heappush(heap, (-load_E[e] / len(holders[e]), e))
    return added


def plan_placement(
    load_E: Any, ownership: Placement, topology: Topology, t: int, m: int
) -> Placement:
    """Predicted placement P1 ⊇ ownership from estimated loads.

    t <- min(t, E), m <- min(m, t). t <= m: the top-t experts go to every rank. Otherwise the W·m
    slots are dealt per [Note: proportional slots, nodes first]. Experts with zero estimated
    load are never replicated. Replicas already in `ownership` count against m.
    """
    loads = _as_floats(load_E)
    E, W = ownership.num_experts, ownership.world_size
    if len(loads) != E:
        raise ValueError(f"plan_placement: got {len(loads)} loads, expected E={E}")
    if topology.world_size != W:
        raise ValueError(f"plan_placement: topology has {topology.world_size} ranks, expected {W}")
    t = min(max(t, 0), E)
    m = min(max(m, 0), t)
    if t == 0 or m == 0:
        return ownership
    top = _top(loads, t)
    if t > m:
        return ownership.with_replicas(_deal_slots(loads, top, ownership, topology, m))
    free = free_slots(ownership, m)
    added: dict[int, list[int]] = {}
    for r in range(W):
        for e in top:
            if free[r] and r not in ownership.holders[e]:
                added.setdefault(e, []).append(r)
                free[r] -= 1
    return ownership.with_replicas(added)


# -- exact placement (after routing) ---------------------------------------------------------

# [Note: exact mode]
# Rows per rank are modelled by the even split (holder_quotas), under which adding a replica of
# e changes the rows of e's holders alone and is cheap to evaluate; assign_tokens may then level
# the rows further ([Note: levelling quotas] in fssdp/assign.py), which never raises the max.
# Two greedies, combined:
# - seed (D'Hondt + LPT): deal k extra copies to experts by the largest true load per copy
#   (as in [Note: proportional slots, nodes first]), then place the copies largest share first on
#   the rank with the least planned rows that has a free slot and lacks the expert (ties: id).
#   Good at giving a very hot expert several copies at once, blind to where owners pile up.
# - polish (hill climbing): take the rank with the most rows (ties: id), try its experts by the
#   rows it computes for them (most first, ties: id), each on the ranks with a free slot that
#   lack it, least rows first (ties: same node as the hot rank, then id); take the first pair
#   that strictly lowers (max rows, number of ranks at max); stop when none does. Good at fixing
#   owner pile-ups, but stalls when two moves are needed (each one alone overshoots by a little).
# A candidate is seed(k) then polish, for k in {0, K/4, K/2, 3K/4, K} (K = free slots); every
# candidate keeps its pairs in order with the rows after each, and the result is the best prefix
# of any candidate: lowest (max rows, ranks at max), then fewest pairs, then first candidate.
# On random Zipf cases this lands within a few % of the mean where either greedy alone is
# ~5-15% off; cost is five polishes, each <= K steps of O(experts of the hot rank x W x W).

Step = tuple[tuple[int, int], list[int]]  # ((expert, rank) added, rows per rank after it)


class _ExactState:
    """Holders' quotas and rows per rank for one count matrix, updated one replica at a time."""

    def __init__(self, counts: list[list[int]], base: Placement, topology: Topology, m: int):
        W, E = base.world_size, base.num_experts
        self.topology = topology
        self.cols = [[counts[s][e] for s in range(W)] for e in range(E)]
        self.free = free_slots(base, m)
        self.quota = [self._quota(e, base.holders[e]) for e in range(E)]
        self.rows = [0] * W
        for q in self.quota:
            for h, n in q.items():
                self.rows[h] += n

    def _quota(self, e: int, holders: Any) -> dict[int, int]:
        hs = sorted(holders)
        return dict(zip(hs, holder_quotas(self.cols[e], hs, self.topology)))

    def trial(self, e: int, r: int) -> tuple[list[int], dict[int, int]]:
        """Rows per rank and e's quotas if r also held e."""
        q = self._quota(e, [*self.quota[e], r])
        rows = list(self.rows)
        for h, n in self.quota[e].items():
            rows[h] -= n
        for h, n in q.items():
            rows[h] += n
        return rows, q

    def add(self, e: int, r: int, trial: tuple[list[int], dict[int, int]] | None = None) -> Step:
        self.rows, self.quota[e] = trial or self.trial(e, r)
        self.free[r] -= 1
        return (e, r), self.rows

    def polish_step(self) -> Step | None:
        """Add the first pair that improves (max rows, ranks at max), or None."""
        W = len(self.rows)
        hot = min(range(W), key=lambda r: (-self.rows[r], r))
        best = _objective(self.rows)
        node = self.topology.node_of(hot)
        experts = sorted(
            (e for e, q in enumerate(self.quota) if q.get(hot, 0) > 0),
            key=lambda e: (-self.quota[e][hot], e),
        )
        for e in experts:
            cands = [r for r in range(W) if self.free[r] and r not in self.quota[e]]
            cands.sort(key=lambda r: (self.rows[r], self.topology.node_of(r) != node, r))
            for r in cands:
                trial = self.trial(e, r)
                if _objective(trial[0]) < best:
                    return self.add(e, r, trial)
        return None


def _objective(rows: list[int]) -> tuple[int, int]:
    top = max(rows)
    return top, rows.count(top)


def _seed_pairs(
    load_E: list[int], base: Placement, free: list[int], k: int
) -> list[tuple[int, int]]:
    """D'Hondt k copies over experts by load per copy, placed largest share first (LPT)."""
    W, E = base.world_size, base.num_experts
    copies = [len(hs) for hs in base.holders]
    heap = [(-load_E[e] / copies[e], e) for e in range(E) if load_E[e] > 0 and copies[e] < W]
    heapq.heapify(heap)
    for _ in range(min(k, sum(free))):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < W:
            heapq.heappush(heap, (-load_E[e] / copies[e], e))
    planned = [0.0] * W
    for e, hs in enumerate(base.holders):
        for h in sorted(hs):
            planned[h] += load_E[e] / copies[e]
    items = sorted(
        (
            (e, load_E[e] / copies[e])
            for e in range(E)
            for _ in range(copies[e] - len(base.holders[e]))
        ),
        key=lambda it: (-it[1], it[0]),
    )
    free, holders = list(free), [set(hs) for hs in base.holders]
    pairs: list[tuple[int, int]] = []
    for e, share in items:
        cands = [r for r in range(W) if free[r] and r not in holders[e]]
        if cands:
            r = min(cands, key=lambda r: (planned[r], r))
            planned[r] += share
            free[r] -= 1
            holders[e].add(r)
            pairs.append((e, r))
    return pairs


def _exact_candidates(
    counts_WE: Any, base: Placement, topology: Topology, m: int
) -> tuple[list[int], list[list[Step]]]:
    """(rows per rank under base, one step sequence per seed size) per [Note: exact mode]."""
    if topology.world_size != base.world_size:
        raise ValueError(
            f"planner: topology has {topology.world_size} ranks, placement {base.world_size}"
        )
    counts = as_count_matrix(counts_WE, base.world_size, base.num_experts)
    load_E = [sum(col) for col in zip(*counts)] if counts else []
    free = free_slots(base, max(m, 0))
    K = sum(free)
    candidates: list[list[Step]] = []
    for k in sorted({0, K // 4, K // 2, 3 * K // 4, K}):
        state = _ExactState(counts, base, topology, max(m, 0))
        steps = [state.add(e, r) for e, r in _seed_pairs(load_E, base, free, k)]
        while any(state.free) and (step := state.polish_step()) is not None:
            steps.append(step)
        candidates.append(steps)
    return _ExactState(counts, base, topology, 0).rows, candidates


def _with_pairs(base: Placement, pairs: Sequence[tuple[int, int]]) -> Placement:
    added: dict[int, list[int]] = {}
    for e, r in pairs:
        added.setdefault(e, []).append(r)
    return base.with_replicas(added) if added else base


def plan_exact(counts_WE: Any, ownership: Placement, topology: Topology, m: int) -> Placement:
    """Placement ⊇ ownership that balances rows per rank for the true counts (after routing).

    At most m replicas per rank (replicas already in `ownership` count). Never worse than
    `ownership` in max rows per rank. See [Note: exact mode].
    """
    rows0, candidates = _exact_candidates(counts_WE, ownership, topology, m)
    best_key, best_pairs = (*_objective(rows0), 0), []
    for steps in candidates:
        for k, (_, rows) in enumerate(steps, start=1):
            if (key := (*_objective(rows), k)) < best_key:
                best_key, best_pairs = key, [pair for pair, _ in steps[:k]]
    return _with_pairs(ownership, best_pairs)


# [Note: calibration]
# The predicted placement was planned from estimates; once the router has run the true counts are
# known. Extending `predicted` with the exact planner (same cap m, predicted replicas counted)
# gives candidate sequences of extra pairs ([Note: exact mode]). Taking the first k of one
# gains (max_rows_before - max_rows_k) * time_per_row_s on the critical path and costs the
# transfer time of the busiest link: max over ranks of bytes sent (owners send) or received
# (new holders receive), over the bandwidth. The prefix with the largest positive net gain wins
# (ties: the first found); none positive keeps `predicted`. Counting the receive side too matters
# when one owner's experts are spread to many ranks at once or one rank takes several.


def calibrate(
    predicted: Placement,
    counts_WE: Any,
    topology: Topology,
    m: int,
    expert_bytes: int,
    bandwidth_bytes_per_s: float,
    time_per_row_s: float,
) -> Placement:
    """predicted ∪ the extra pairs worth their transfer, per [Note: calibration]."""
    if bandwidth_bytes_per_s <= 0:
        return predicted
    rows0, candidates = _exact_candidates(counts_WE, predicted, topology, m)
    W, start = predicted.world_size, max(rows0)
    best_net, best_pairs = 0.0, []
    for steps in candidates:
        sent, recv = [0] * W, [0] * W  # expert copies per rank in the first k pairs
        for k, ((e, r), rows) in enumerate(steps, start=1):
            sent[predicted.owner[e]] += 1
            recv[r] += 1
            cost = max(max(sent), max(recv)) * expert_bytes / bandwidth_bytes_per_s
            net = (start - max(rows)) * time_per_row_s - cost
            if net > best_net:  # strict: ties keep the earlier (shorter or first) choice
                best_net, best_pairs = net, [pair for pair, _ in steps[:k]]
    return _with_pairs(predicted, best_pairs)
