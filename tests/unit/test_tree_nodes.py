"""[Note: node relays]: the 'tree_nodes' schedule is a valid broadcast that crosses nodes once
per receiving node, and is the binomial tree on one node (collectives/schedule.py)."""

from __future__ import annotations

import random

from collectives.algorithms import choose, names
from collectives.placement import Placement, Topology
from collectives.schedule import Diff, tree_from, tree_nodes_from
from tests.unit.test_algorithms import random_pair


def check_broadcast(p0: Placement, p1: Placement, topo: Topology | None) -> None:
    sched = tree_nodes_from(Diff.of(p0, p1), topo)
    has = {(e, r) for e in range(p0.num_experts) for r in p0.holders[e]}
    got: list[tuple[int, int]] = []
    for rnd in sched:
        for e, s, _ in rnd:
            assert (e, s) in has, f"rank {s} sends expert {e} before it holds it"
        for e, _, d in rnd:
            has.add((e, d))
            got.append((e, d))
    assert sorted(got) == sorted(p1.extra_pairs(p0)), "every new holder receives exactly once"
    if topo is None:
        return
    R = topo.ranks_per_node
    for e in range(p0.num_experts):
        nodes = {r // R for r in p1.holders[e] - p0.holders[e]} - {p0.owner[e] // R}
        crossing = [1 for rnd in sched for x, s, d in rnd if x == e and s // R != d // R]
        assert len(crossing) == len(nodes), (e, len(crossing), nodes)


def test_valid_broadcast_crossing_nodes_once_per_receiving_node() -> None:
    rng = random.Random(11)
    for _ in range(300):
        p0, p1, topo = random_pair(rng)
        check_broadcast(p0, p1, topo)


def test_one_node_or_no_topology_is_the_binomial_tree() -> None:
    rng = random.Random(2)
    for _ in range(100):
        p0, p1, _ = random_pair(rng)
        d, W = Diff.of(p0, p1), p1.world_size
        assert tree_nodes_from(d, None) == tree_from(d, None)
        assert tree_nodes_from(d, Topology(W, W)) == tree_from(d, Topology(W, W))


def test_an_expert_for_another_node_crosses_once_where_the_tree_crosses_three_times() -> None:
    p0 = Placement.from_owners([0, 4], 8)
    p1 = p0.with_replicas({0: [4, 5, 6, 7]})
    topo, d = Topology(8, 4), Diff.of(p0, p1)

    def crossings(sched: object) -> int:
        return sum(1 for rnd in sched for _, s, r in rnd if s // 4 != r // 4)  # type: ignore[attr-defined]

    assert crossings(tree_from(d, topo)) == 3 and crossings(tree_nodes_from(d, topo)) == 1
    assert "tree_nodes" in names()
    algo = choose(p0, p1, expert_bytes=1 << 20, algorithm="tree_nodes", topology=topo)
    assert algo.schedule == tree_nodes_from(d, topo)
