"""Placement / Topology validation and helpers, schedules and the cost rule (no processes)."""

from __future__ import annotations

import math
import random

import pytest

from collectives import CostModel, Placement, Topology, algorithm_costs, choose_algorithm
from collectives.schedule import (
    check_gather,
    check_reduce,
    direct_schedule,
    reverse_schedule,
    tree_schedule,
)


def test_from_owners_and_queries() -> None:
    p = Placement.from_owners([2, 0, 2, 1], world_size=3)
    assert p.num_experts == 4 and p.world_size == 3
    assert p.holders == (frozenset({2}), frozenset({0}), frozenset({2}), frozenset({1}))
    assert p.owned(2) == [0, 2] and p.held(2) == [0, 2] and p.owned(1) == [3]
    q = p.with_replicas({1: [1, 2], 3: (0,)})
    assert p.held(2) == [0, 2], "with_replicas must not mutate"
    assert q.held(2) == [0, 1, 2] and q.owned(2) == [0, 2]
    assert q.held(0) == [1, 3] and q.held(1) == [1, 3]
    assert q.num_replicas() == [0, 2, 0, 1]
    assert p.is_subset_of(q) and not q.is_subset_of(p)
    assert q.extra_pairs(p) == [(1, 1), (1, 2), (3, 0)]
    assert p.extra_pairs(q) == []
    assert q.ownership() == p and p.is_ownership_only() and not q.is_ownership_only()
    assert q.pairs() == p.pairs() | {(1, 1), (1, 2), (3, 0)}


def test_equality_ignores_container_types() -> None:
    a = Placement(2, 2, [0, 1], [{0}, {1, 0}])
    b = Placement(2, 2, (0, 1), (frozenset({0}), frozenset({0, 1})))
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        ((2, 2, (0,), ({0}, {1})), "owner has 1 entries, expected E=2"),
        ((2, 2, (0, 1), ({0},)), "holders has 1 entries, expected E=2"),
        ((2, 2, (0, None), ({0}, {1})), "expert 1 has no owner"),
        ((2, 2, (0, -1), ({0}, {1})), "expert 1 has no owner"),
        ((2, 2, (0, 2), ({0}, {2})), "expert 1: owner rank 2 out of range [0, 2)"),
        ((2, 2, (0, 1), ({0}, {1, 5})), "expert 1: holder rank(s) [5] out of range [0, 2)"),
        ((2, 2, (0, 1), ({0}, {0})), "expert 1: holder set [0] does not include its owner rank 1"),
        ((1, 0, (0,), ({0},)), "world_size must be >= 1"),
    ],
)
def test_placement_validation_messages(args: tuple, msg: str) -> None:
    with pytest.raises(ValueError) as info:
        Placement(*args)
    assert msg in str(info.value)


def test_helper_validation_messages() -> None:
    p = Placement.from_owners([0, 1], 2)
    with pytest.raises(ValueError, match="expert 7 out of range"):
        p.with_replicas({7: [0]})
    with pytest.raises(ValueError, match=r"holder rank\(s\) \[3\] out of range"):
        p.with_replicas({0: [3]})
    with pytest.raises(ValueError, match="expert 0 has no owner"):
        Placement.from_owners([None, 1], 2)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cannot compare banks"):
        p.extra_pairs(Placement.from_owners([0], 2))
    q = Placement.from_owners([1, 1], 2)
    with pytest.raises(ValueError, match=r"disagree on the owner of experts \[0\]"):
        check_gather(p, q)
    with pytest.raises(ValueError, match="placement_from ⊆ placement_to"):
        check_gather(p.with_replicas({0: [1]}), p)
    with pytest.raises(ValueError, match="placement_to = ownership only"):
        check_reduce(p.with_replicas({0: [1]}), p.with_replicas({0: [1]}))


def test_topology() -> None:
    t = Topology(world_size=8, ranks_per_node=4)
    assert t.num_nodes == 2 and [t.node_of(r) for r in range(8)] == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="rank 8 out of range"):
        t.node_of(8)
    with pytest.raises(ValueError, match="ranks_per_node=3 must be >= 1 and divide world_size=8"):
        Topology(8, 3)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        Topology(0, 1)


def _random_pair(rng: random.Random, E: int, W: int, lam: float) -> tuple[Placement, Placement]:
    p0 = Placement.from_owners([rng.randrange(W) for _ in range(E)], W)
    reps = {e: [r for r in range(W) if rng.random() < lam] for e in range(E)}
    return p0, p0.with_replicas(reps)


def test_tree_schedule_is_a_valid_broadcast() -> None:
    rng = random.Random(0)
    for _ in range(200):
        W = rng.randint(1, 9)
        p0, p1 = _random_pair(rng, rng.randint(0, 10), W, rng.random())
        topo = Topology(W, 1) if rng.random() < 0.5 else None
        direct = direct_schedule(p0, p1)
        tree = tree_schedule(p0, p1, topo)
        new = set(p1.extra_pairs(p0))
        assert {(e, d) for rnd in direct for e, _, d in rnd} == new
        got = [(e, d) for rnd in tree for e, _, d in rnd]
        assert sorted(got) == sorted(new), "each new holder receives exactly once"
        have = set(p0.pairs())
        for rnd in tree:
            assert all((e, s) in have for e, s, _ in rnd), "relays only forward what they have"
            senders = [(e, s) for e, s, _ in rnd]
            assert len(senders) == len(set(senders)), "one copy per expert per sender per round"
            have |= {(e, d) for e, _, d in rnd}
        fan = max((len(p1.holders[e] - p0.holders[e]) for e in range(p1.num_experts)), default=0)
        assert len(tree) == (math.ceil(math.log2(fan + 1)) if fan else 0)


def test_reverse_schedule() -> None:
    assert reverse_schedule([[(0, 1, 2)], [(0, 1, 3), (1, 0, 2)]]) == [
        [(0, 3, 1), (1, 2, 0)],
        [(0, 2, 1)],
    ]


def test_cost_rule() -> None:
    W, E, mb = 8, 16, 1 << 20
    p0 = Placement.from_owners([e % W for e in range(E)], W)
    hot = p0.with_replicas({0: range(W)})  # one expert to every rank: owner sends 7 copies
    spread = p0.with_replicas({e: [(e + 1) % W] for e in range(E)})  # one replica each
    # Bytes only: the busiest link carries 7 copies in the one a2a; the tree 1 per round x 3.
    free = CostModel(0.0, 0.0)
    assert algorithm_costs(p0, hot, expert_bytes=mb, cost_model=free) == {
        "a2a": 7 * mb,
        "tree": 3 * mb,
        "tree_nodes": 3 * mb,  # no topology: the tree's own schedule
    }
    cm = CostModel(a2a_peer_bytes=100_000, round_bytes=1_000_000)
    assert algorithm_costs(p0, hot, expert_bytes=mb, cost_model=cm) == {
        "a2a": 7 * 100_000 + 7 * mb,
        "tree": 3 * (1_000_000 + mb),
        "tree_nodes": 3 * (1_000_000 + mb),
    }
    assert choose_algorithm(p0, hot, expert_bytes=mb, cost_model=cm) == "tree"
    assert choose_algorithm(hot, p0, expert_bytes=mb, cost_model=cm) == "tree", "spRS agrees"
    assert choose_algorithm(p0, hot, expert_bytes=1024, cost_model=cm) == "a2a", "latency wins"
    assert choose_algorithm(p0, spread, expert_bytes=mb, cost_model=cm) == "a2a"
    assert choose_algorithm(p0, p0, expert_bytes=mb, cost_model=cm) == "a2a", "nothing to move"
    # The gloo-calibrated defaults: a round is cheaper than one a2a peer, so one-round
    # exchanges go point-to-point too; a fan-out over many ranks by tree.
    assert choose_algorithm(p0, hot, expert_bytes=mb) == "tree"
    two = Placement.from_owners([0, 1], 2)
    assert choose_algorithm(two, two.with_replicas({0: [1]}), expert_bytes=mb) == "tree"


def test_tree_order_crosses_nodes_once() -> None:
    W = 8
    p0 = Placement.from_owners([1], W)
    p1 = p0.with_replicas({0: range(W)})
    topo = Topology(W, 4)
    cross = [
        (s, d)
        for rnd in tree_schedule(p0, p1, topo)
        for _, s, d in rnd
        if topo.node_of(s) != topo.node_of(d)
    ]
    assert len(cross) == 1, cross
