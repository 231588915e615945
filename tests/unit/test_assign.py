"""Topology-aware token assignment (fssdp.assign): pure, single process.

Legend: W ranks, E experts, counts[s][e] rows of expert e on source rank s.
"""

from __future__ import annotations

import random

import pytest
import torch

from collectives.placement import Placement, Topology
from fssdp.assign import (
    LEVEL_GAIN,
    assign_tokens,
    expert_quotas,
    holder_quotas,
    rows_per_rank,
    send_counts,
)


def random_case(rng: random.Random, W: int, E: int) -> tuple[list[list[int]], Placement]:
    """Skewed random counts (some zero rows, some zero experts) and a random placement."""
    hot = [rng.choice([0, 0, 1, 5, 20]) for _ in range(E)]
    counts = [[rng.randint(0, 3 * h) if rng.random() < 0.8 else 0 for h in hot] for _ in range(W)]
    owner = [rng.randrange(W) for _ in range(E)]
    replicas = {e: rng.sample(range(W), rng.randint(0, W - 1)) for e in range(E)}
    return counts, Placement.from_owners(owner, W).with_replicas(replicas)


def received_per_holder(plan: list, e: int, W: int) -> list[int]:
    got = [0] * W
    for s in range(W):
        for h, n in plan[s][e]:
            got[h] += n
    return got


def check_invariants(counts: list[list[int]], p: Placement, plan: list, topo: Topology) -> None:
    W, E = topo.world_size, p.num_experts
    assert len(plan) == W and all(len(row) == E for row in plan)
    quotas = expert_quotas(counts, p, topo)
    for e in range(E):
        for s in range(W):
            chunks = plan[s][e]
            assert sum(n for _, n in chunks) == counts[s][e]
            assert all(n > 0 for _, n in chunks), "no zero-size chunks"
            assert all(h in p.holders[e] for h, _ in chunks), "dests must hold the expert"
            assert [h for h, _ in chunks] == sorted({h for h, _ in chunks}), "sorted, one per dest"
            if s in p.holders[e]:  # a holder keeps its own rows up to its quota
                kept = sum(n for h, n in chunks if h == s)
                assert kept == min(counts[s][e], quotas[e][s])
        got = received_per_holder(plan, e, W)
        assert {h: got[h] for h in sorted(p.holders[e])} == quotas[e], f"expert {e}: {got}"
    # Levelling never makes the busiest rank busier than the even split would.
    even = [0] * W
    for e in range(E):
        hs = sorted(p.holders[e])
        for h, q in zip(hs, holder_quotas([c[e] for c in counts], hs, topo)):
            even[h] += q
    assert max(rows_per_rank(counts, plan)) <= max(even)


SHAPES = [(W, rpn) for W in (1, 2, 3, 4, 8) for rpn in (1, 2, 4) if W % rpn == 0]


@pytest.mark.parametrize(("W", "rpn"), SHAPES)
def test_random_matrices_invariants(W: int, rpn: int) -> None:
    rng = random.Random(1000 * W + rpn)
    topo = Topology(W, rpn)
    for _ in range(25):
        E = rng.randint(1, 6)
        counts, p = random_case(rng, W, E)
        plan = assign_tokens(counts, p, topo)
        check_invariants(counts, p, plan, topo)
        assert plan == assign_tokens(counts, p, topo), "deterministic"
        rows = rows_per_rank(counts, plan)
        assert sum(rows) == sum(map(sum, counts))
        sends = [send_counts(plan, s, W) for s in range(W)]
        assert [sum(x) for x in sends] == [sum(c) for c in counts]
        assert [sum(col) for col in zip(*sends)] == rows


def test_local_rows_stay_local_under_quota() -> None:
    # Expert 0 on ranks 0 and 1 (one node); 6 rows in all, quota 3 each; both sources <= 3.
    topo = Topology(4, 2)
    p = Placement.from_owners([0], 4).with_replicas({0: [1]})
    counts = [[3], [2], [1], [0]]
    plan = assign_tokens(counts, p, topo)
    assert plan[0][0] == [(0, 3)] and plan[1][0] == [(1, 2)]
    assert plan[2][0] == [(1, 1)] and plan[3][0] == []


def test_same_node_before_cross_node() -> None:
    # Holders 1 (node 0) and 2 (node 1); source 0 (node 0) must go to 1, source 3 (node 1) to 2.
    topo = Topology(4, 2)
    p = Placement.from_owners([1], 4).with_replicas({0: [2]})
    plan = assign_tokens([[4], [0], [0], [4]], p, topo)
    assert plan[0][0] == [(1, 4)] and plan[3][0] == [(2, 4)]
    # Node 0 has no holder: its rows cross, split evenly between the node-1 holders.
    p2 = Placement.from_owners([2], 4).with_replicas({0: [3]})
    plan2 = assign_tokens([[3], [3], [0], [0]], p2, topo)
    assert received_per_holder(plan2, 0, 4) == [0, 0, 3, 3]
    # Three nodes, holders 0 (node 0) and 2 (node 1): rank order alone would send source 3's
    # rows to rank 0 and source 4's to rank 2; node first keeps source 3 in its node.
    p3 = Placement.from_owners([0], 6).with_replicas({0: [2]})
    plan3 = assign_tokens([[0], [0], [0], [2], [2], [0]], p3, Topology(6, 2))
    assert plan3[3][0] == [(2, 2)] and plan3[4][0] == [(0, 2)]


def test_no_cross_node_traffic_when_every_node_holds_every_loaded_expert() -> None:
    rng = random.Random(7)
    topo = Topology(8, 4)
    E = 5
    for _ in range(20):
        # Same holder count per node and per-node rows matching the per-node quota.
        per_node = rng.randint(1, 4)
        replicas = {
            e: rng.sample(range(4), per_node) + [4 + r for r in rng.sample(range(4), per_node)]
            for e in range(E)
        }
        owner = [replicas[e][0] for e in range(E)]
        p = Placement.from_owners(owner, 8).with_replicas(replicas)
        base = [rng.randint(0, 5) for _ in range(E)]
        counts = [list(base) for _ in range(8)]
        counts[0][E - 1] = 0  # an expert with rows on node 0 ...
        counts[5][E - 1] = 0  # ... balanced by the same shortfall on node 1
        plan = assign_tokens(counts, p, topo)
        for s in range(8):
            for e in range(E):
                assert all(topo.node_of(h) == topo.node_of(s) for h, _ in plan[s][e]), (s, e)


def test_hot_expert_replicated_everywhere_balances_perfectly() -> None:
    W, topo = 4, Topology(4, 2)
    p = Placement.from_owners([0, 1], W).with_replicas({0: range(W)})
    counts = [[10, 0], [3, 0], [0, 0], [7, 0]]  # 20 rows of expert 0 only
    rows = rows_per_rank(counts, assign_tokens(counts, p, topo))
    assert rows == [5, 5, 5, 5]


def test_zero_rows_produce_no_chunks_and_tensor_input() -> None:
    topo = Topology(2, 1)
    p = Placement.from_owners([0, 1, 1], 2).with_replicas({1: [0]})
    counts_WE = torch.tensor([[0, 4, 0], [2, 0, 0]])
    plan = assign_tokens(counts_WE, p, topo)
    assert plan == [[[], [(0, 2), (1, 2)], []], [[(0, 2)], [], []]]
    assert rows_per_rank(counts_WE, plan) == [4, 2]  # one rank per node: nothing to level
    assert send_counts(plan, 0, 2) == [2, 2] and send_counts(plan, 1, 2) == [2, 0]


def test_remainder_goes_to_holder_with_local_excess() -> None:
    # 5 rows over 2 holders in one node: quota 2 each, the +1 goes to rank 1 (5 local rows).
    topo = Topology(2, 2)
    p = Placement.from_owners([0], 2).with_replicas({0: [1]})
    plan = assign_tokens([[0], [5]], p, topo)
    assert plan[1][0] == [(0, 2), (1, 3)]


def test_bad_input_messages() -> None:
    topo = Topology(2, 1)
    p = Placement.from_owners([0], 2)
    with pytest.raises(ValueError, match="expected one per rank"):
        assign_tokens([[1]], p, topo)
    with pytest.raises(ValueError, match="expected one per expert"):
        assign_tokens([[1, 2], [3, 4]], p, topo)
    with pytest.raises(ValueError, match="negative count"):
        assign_tokens([[-1], [0]], p, topo)
    with pytest.raises(ValueError, match="placement is for world 2, topology for 4"):
        assign_tokens([[1]] * 4, p, Topology(4, 2))


def test_levelling_offsets_unreplicated_load() -> None:
    # The profile's case at world 2: experts 0 and 1 on both ranks, rank 0 also owns 2..6.
    topo = Topology(2, 2)
    p = Placement.from_owners([0] * 8 + [1] * 8, 2).with_replicas({0: [1], 1: [1]})
    load = [2046, 1636, 305, 52, 33, 19, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    counts = [[c // 2 for c in load], [c - c // 2 for c in load]]
    rows = rows_per_rank(counts, assign_tokens(counts, p, topo))
    even = [(2046 + 1636) // 2 + 305 + 52 + 33 + 19 + 5, (2046 + 1636) // 2]
    assert rows == [sum(load) // 2, sum(load) - sum(load) // 2], (rows, even)
    # Rank 0 keeps only part of its own rows of the replicated experts; the rest move to rank 1.
    quotas = expert_quotas(counts, p, topo)
    assert quotas[0][0] + quotas[1][0] == sum(load) // 2 - (305 + 52 + 33 + 19 + 5)


def test_levelling_pours_into_the_least_loaded_holder_only() -> None:
    # Expert 2 on ranks 0,1,2; base loads 10, 0, 30 from unreplicated experts 0, 1, 3.
    topo = Topology(3, 3)
    p = Placement.from_owners([0, 1, 0, 2], 3).with_replicas({2: [1, 2]})
    counts = [[10, 0, 6, 30], [0, 0, 6, 0], [0, 0, 0, 0]]
    assert expert_quotas(counts, p, topo)[2] == {0: 1, 1: 11, 2: 0}
    assert rows_per_rank(counts, assign_tokens(counts, p, topo)) == [11, 11, 30]


def test_small_gain_keeps_even_split_and_locality() -> None:
    # Levelling would lower the max by 1 row of 100: under LEVEL_GAIN, the even split stands.
    topo = Topology(2, 1)
    p = Placement.from_owners([0, 0], 2).with_replicas({0: [1]})
    counts = [[50, 1], [48, 0]]
    assert 1 / 50 <= LEVEL_GAIN
    assert expert_quotas(counts, p, topo)[0] == {0: 49, 1: 49}
    assert rows_per_rank(counts, assign_tokens(counts, p, topo)) == [50, 49]


def test_levelling_stays_inside_each_node() -> None:
    # Two nodes of two; expert 0 on every rank, rank 0 also owns the busy expert 1.
    topo = Topology(4, 2)
    p = Placement.from_owners([0, 0], 4).with_replicas({0: [1, 2, 3]})
    counts = [[10, 20], [10, 0], [10, 0], [10, 0]]
    q = expert_quotas(counts, p, topo)[0]
    assert q[0] + q[1] == 20 and q[2] + q[3] == 20, "nodes keep the even split's rows"
    assert q == {0: 0, 1: 20, 2: 10, 3: 10}
    plan = assign_tokens(counts, p, topo)
    assert all(topo.node_of(h) == topo.node_of(s) for s in range(4) for h, _ in plan[s][0])
