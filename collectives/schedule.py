"""Who sends which expert to whom, in which round; and the cost rule that picks an algorithm.

Legend: a transfer is (e, src, dst): expert e's vector moves from rank src to rank dst. A
schedule is a list of rounds, each a list of transfers that run concurrently. Everything here is
a pure function of the placements, so every rank computes the same schedule with no messages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from collectives.placement import Placement, Topology

Transfer = tuple[int, int, int]  # (expert, src rank, dst rank)
Schedule = list[list[Transfer]]
Algorithm = Literal["a2a", "tree"]


@dataclass(frozen=True)
class CostModel:
    """Latencies of the alpha-beta cost rule, in bytes: what the busiest link moves in that time
    (alpha / beta), so only the ratio to bandwidth matters.

    # [Note: calibrated defaults]
    `calibrate_cost_model(group)` measures both on the group at hand: one tiny message rank 0 ->
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


def _gather_fanout(small: Placement, big: Placement) -> list[tuple[int, int, list[int]]]:
    """Per expert with new holders: (e, owner, sorted new ranks)."""
    return [
        (e, big.owner[e], sorted(big.holders[e] - small.holders[e]))
        for e in range(big.num_experts)
        if big.holders[e] - small.holders[e]
    ]


def direct_schedule(small: Placement, big: Placement) -> Schedule:
    """One round: the owner sends to every new holder (spAG direction)."""
    rnd = [(e, o, r) for e, o, dsts in _gather_fanout(small, big) for r in dsts]
    return [rnd] if rnd else []


def _tree_order(owner: int, ranks: list[int], world: int, topo: Topology | None) -> list[int]:
    # Cyclic distance from the owner spreads the first hops of different owners over different
    # receivers; with a topology, ranks of the owner's node come first and each node's ranks are
    # contiguous, so a binomial tree crosses each node boundary once.
    def key(r: int) -> tuple[int, int]:
        if topo is None:
            return (0, (r - owner) % world)
        n = topo.num_nodes
        return ((topo.node_of(r) - topo.node_of(owner)) % n, (r - owner) % world)

    return [owner] + sorted(ranks, key=key)


def tree_schedule(small: Placement, big: Placement, topo: Topology | None = None) -> Schedule:
    """Per-expert binomial broadcast trees run side by side (spAG direction).

    # [Note: binomial relay]
    For expert e with order L = [owner, d1, d2, ...] (n = len(L)) and R = ceil(log2 n) rounds,
    round k uses stride 2^(R-1-k): every L[i] with i a multiple of 2*stride (it already has e)
    sends to L[i + stride]. Far halves are served first (recursive halving), so when L lists each
    node's ranks contiguously, only the first hops cross nodes. No rank sends more than one copy
    of e per round, so a hot expert's owner is no longer the bottleneck; an expert with one new
    holder takes a single round, exactly as in the direct schedule.
    """
    rounds: Schedule = []
    for e, o, dsts in _gather_fanout(small, big):
        order = _tree_order(o, dsts, big.world_size, topo)
        n = len(order)
        R = (n - 1).bit_length()  # ceil(log2 n) for n >= 2
        rounds.extend([] for _ in range(R - len(rounds)))
        for k in range(R):
            stride = 1 << (R - 1 - k)
            rounds[k].extend(
                (e, order[i], order[i + stride]) for i in range(0, n - stride, 2 * stride)
            )
    return rounds


def reverse_schedule(sched: Schedule) -> Schedule:
    """spRS runs the spAG schedule backwards: rounds reversed, src and dst swapped."""
    return [[(e, d, s) for e, s, d in rnd] for rnd in reversed(sched)]


def schedule_cost(sched: Schedule, expert_bytes: int, latency_bytes: float) -> float:
    """Alpha-beta cost in bytes: per round, latency + the busiest rank's send or receive bytes."""
    cost = 0.0
    for rnd in sched:
        if not rnd:
            continue
        sent = Counter(s for _, s, _ in rnd)
        recv = Counter(d for _, _, d in rnd)
        cost += latency_bytes + expert_bytes * max(max(sent.values()), max(recv.values()))
    return cost


def algorithm_costs(
    placement_from: Placement,
    placement_to: Placement,
    *,
    expert_bytes: int,
    cost_model: CostModel = DEFAULT_COST,
    topology: Topology | None = None,
) -> dict[Algorithm, float]:
    """Modelled cost in bytes of each algorithm; either direction (spAG: from ⊆ to; spRS:
    to ⊆ from), since a reduce costs the same as the broadcast it reverses."""
    small, big = (
        (placement_from, placement_to)
        if placement_from.is_subset_of(placement_to)
        else (placement_to, placement_from)
    )
    a2a_latency = cost_model.a2a_peer_bytes * (big.world_size - 1)
    return {
        "a2a": schedule_cost(direct_schedule(small, big), expert_bytes, a2a_latency),
        "tree": schedule_cost(
            tree_schedule(small, big, topology), expert_bytes, cost_model.round_bytes
        ),
    }


def choose_algorithm(
    placement_from: Placement,
    placement_to: Placement,
    *,
    expert_bytes: int,
    cost_model: CostModel = DEFAULT_COST,
    topology: Topology | None = None,
) -> Algorithm:
    """'tree' when the point-to-point binomial schedule's modelled cost is lower than one
    all-to-all's, else 'a2a'. A pure function of its arguments, so every rank agrees."""
    c = algorithm_costs(
        placement_from,
        placement_to,
        expert_bytes=expert_bytes,
        cost_model=cost_model,
        topology=topology,
    )
    return "tree" if c["tree"] < c["a2a"] else "a2a"
