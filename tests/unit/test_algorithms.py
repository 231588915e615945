"""Algorithm registry, array schedules against a loop reference, and the new spAG / spRS modes at
world 1 (no processes).

Legend: E experts, W ranks, S elements per expert; a schedule is a list of rounds of (e, src,
dst) transfers.
"""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from collectives import (
    Algorithm,
    CommStats,
    CostModel,
    Placement,
    Schedule,
    Topology,
    algorithm_costs,
    choose,
    register,
    sparse_all_gather,
    sparse_reduce_scatter,
    unregister,
)
from collectives.algorithms import names
from collectives.schedule import (
    Diff,
    direct_from,
    direct_schedule,
    pair_keys,
    pair_keys_from_holders,
    reverse_schedule,
    schedule_cost,
    tree_schedule,
)

COLLECTIVES = Path(__file__).resolve().parents[2] / "collectives"


# -- the loop implementation the array builders replaced (reference) ----------------------------


def ref_direct(small: Placement, big: Placement) -> list[list[tuple[int, int, int]]]:
    rnd = [
        (e, big.owner[e], r)
        for e in range(big.num_experts)
        for r in sorted(big.holders[e] - small.holders[e])
    ]
    return [rnd] if rnd else []


def ref_tree(
    small: Placement, big: Placement, topo: Topology | None
) -> list[list[tuple[int, int, int]]]:
    W = big.world_size
    rounds: list[list[tuple[int, int, int]]] = []
    for e in range(big.num_experts):
        o = big.owner[e]
        new = big.holders[e] - small.holders[e]
        if not new:
            continue

        def key(r: int, o: int = o) -> tuple[int, int]:
            if topo is None:
                return (0, (r - o) % W)
            return ((topo.node_of(r) - topo.node_of(o)) % topo.num_nodes, (r - o) % W)

        order = [o] + sorted(new, key=key)
        n = len(order)
        R = math.ceil(math.log2(n))
        rounds.extend([] for _ in range(R - len(rounds)))
        for k in range(R):
            stride = 1 << (R - 1 - k)
            rounds[k] += [
                (e, order[i], order[i + stride]) for i in range(0, n - stride, 2 * stride)
            ]
    return rounds


def ref_cost(sched: list[list[tuple[int, int, int]]], row: int, latency: float) -> float:
    cost = 0.0
    for rnd in sched:
        sent = [s for _, s, _ in rnd]
        recv = [d for _, _, d in rnd]
        busiest = max(max(sent.count(r), recv.count(r)) for r in set(sent) | set(recv))
        cost += latency + row * busiest
    return cost


def random_pair(rng: random.Random) -> tuple[Placement, Placement, Topology | None]:
    W = rng.randint(1, 24)
    E = rng.randint(0, 20)
    p0 = Placement.from_owners([rng.randrange(W) for _ in range(E)], W)
    lam = rng.random() ** 2
    p1 = p0.with_replicas({e: [r for r in range(W) if rng.random() < lam] for e in range(E)})
    rpn = rng.choice([d for d in range(1, W + 1) if W % d == 0])
    return p0, p1, Topology(W, rpn) if rng.random() < 0.5 else None


def test_array_schedules_match_the_loop_reference() -> None:
    rng = random.Random(7)
    for _ in range(300):
        p0, p1, topo = random_pair(rng)
        d, t = direct_schedule(p0, p1), tree_schedule(p0, p1, topo)
        ref_d, ref_t = ref_direct(p0, p1), ref_tree(p0, p1, topo)
        assert d == ref_d and t == ref_t, (p1, topo)
        assert t.reversed() == [[(e, b, a) for e, a, b in rnd] for rnd in reversed(ref_t)]
        assert t.reversed().reversed() == t
        for row, lat in ((1 << 20, 0.0), (4096, 123_456.7)):
            assert t.cost(row, lat) == ref_cost(ref_t, row, lat)
            assert schedule_cost(ref_d, row, lat) == ref_cost(ref_d, row, lat)
        assert np.array_equal(pair_keys(p1), pair_keys_from_holders(p1))


def test_rank_views_partition_the_schedule() -> None:
    rng = random.Random(3)
    for _ in range(50):
        p0, p1, topo = random_pair(rng)
        sched = tree_schedule(p0, p1, topo)
        W = p1.world_size
        for k, rnd in enumerate(sched):
            for r in range(W):
                rv = sched.for_rank(r).rounds[k]
                sends = sorted((e, r, d) for d, ex in rv.sends for e in ex)
                recvs = sorted((e, s, r) for s, ex in rv.recvs for e in ex)
                assert sends == sorted(t for t in rnd if t[1] == r)
                assert recvs == sorted(t for t in rnd if t[2] == r)
        assert sum(sched.for_rank(r).sent for r in range(W)) == sched.num_transfers
        assert sum(sched.for_rank(r).recv for r in range(W)) == sched.num_transfers


def test_schedule_object() -> None:
    s = Schedule.from_rounds([[(0, 1, 2)], [(0, 1, 3), (1, 0, 2)]])
    assert len(s) == 2 and s.num_transfers == 3 and s[1] == [(0, 1, 3), (1, 0, 2)]
    assert s == [[(0, 1, 2)], [(0, 1, 3), (1, 0, 2)]] and s != [[(0, 1, 2)]]
    assert reverse_schedule(s) == [[(0, 3, 1), (1, 2, 0)], [(0, 2, 1)]]
    assert Schedule.empty() == [] and len(Schedule.empty()) == 0
    assert s.for_rank(1).stats(10) == CommStats(20, 0)
    with pytest.raises(ValueError, match="do not cover"):
        Schedule(np.zeros((2, 3), dtype=np.int64), [0, 1])


def test_choose_returns_the_algorithm_with_its_schedule() -> None:
    W, E, mb = 8, 16, 1 << 20
    p0 = Placement.from_owners([e % W for e in range(E)], W)
    hot = p0.with_replicas({0: range(W)})
    cm = CostModel(a2a_peer_bytes=100_000, round_bytes=1_000_000)
    topo = Topology(W, 4)
    algo = choose(p0, hot, expert_bytes=mb, cost_model=cm, topology=topo)
    assert algo.name == "tree" and algo.schedule == tree_schedule(p0, hot, topo)
    assert choose(hot, p0, expert_bytes=mb, cost_model=cm, topology=topo).name == "tree"
    a2a = choose(p0, hot, expert_bytes=mb, algorithm="a2a")
    assert a2a.name == "a2a" and a2a.schedule == direct_schedule(p0, hot)
    costs = algorithm_costs(p0, hot, expert_bytes=mb, cost_model=cm, topology=topo)
    assert costs["tree"] == algo.cost(mb, cm) and costs["a2a"] == a2a.cost(mb, cm)
    assert set(names()) >= {"a2a", "tree"}
    with pytest.raises(ValueError, match=r"one of \['a2a', 'tree'"):
        choose(p0, hot, expert_bytes=mb, algorithm="ring")


def test_built_algorithms_are_memoised_per_placement_objects() -> None:
    p0 = Placement.from_owners([0, 1, 1], 2)
    p1 = p0.with_replicas({1: [0]})
    a = choose(p0, p1, expert_bytes=64, algorithm="tree")
    assert choose(p1, p0, expert_bytes=64, algorithm="tree") is a, "same objects: reused"
    twin = p0.with_replicas({1: [0]})  # equal, but another object
    assert choose(p0, twin, expert_bytes=64, algorithm="tree") is not a
    assert choose(p0, twin, expert_bytes=64, algorithm="tree").schedule == a.schedule

    class Extra(Algorithm):
        name = "extra_test"

    register(Extra)  # type: ignore[type-abstract]
    unregister("extra_test")
    assert choose(p0, p1, expert_bytes=64, algorithm="tree") is not a, "registry changed"


def test_register_refuses_bad_names() -> None:
    class Nameless(Algorithm):  # abstract methods are not reached: register checks first
        pass

    with pytest.raises(ValueError, match="needs a class attribute name"):
        register(Nameless)

    class Clash(Algorithm):
        name = "a2a"

    with pytest.raises(ValueError, match="'a2a' is already AllToAll"):
        register(Clash)

    class Auto(Algorithm):
        name = "auto"

    with pytest.raises(ValueError, match="not 'auto'"):
        register(Auto)
    unregister("never-registered")  # a no-op


def test_diff_is_the_new_pairs() -> None:
    p0 = Placement.from_owners([2, 0, 1], 3)
    p1 = p0.with_replicas({0: [0, 1], 2: [2]})
    d = Diff.of(p0, p1)
    assert list(zip(d.expert_N.tolist(), d.rank_N.tolist())) == p1.extra_pairs(p0)
    assert d.owner_N.tolist() == [2, 2, 1]
    assert direct_from(d) == [[(0, 2, 0), (0, 2, 1), (2, 1, 2)]]


def test_new_modes_at_world_one_without_process_group() -> None:
    p0 = Placement.from_owners([0, 0, 0], 1)
    x = torch.arange(6.0).reshape(3, 2)
    calls: list[list[int]] = []

    def source(ids: list[int]) -> torch.Tensor:
        calls.append(ids)
        return x[ids]

    buf = torch.empty(0, 2)
    out, st = sparse_all_gather(source, p0, p0, new_only=True, out=buf)
    assert out is buf and st == CommStats(0, 0) and calls == [], "nothing to send: not called"
    full = torch.full((3, 2), 9.0)
    out, _ = sparse_all_gather(source, p0, p0, out=full)
    assert out is full and torch.equal(full, x) and calls == [[0, 1, 2]]
    with pytest.raises(ValueError, match="a callable source needs out="):
        sparse_all_gather(source, p0, p0, new_only=True)
    red, st = sparse_reduce_scatter(torch.zeros(0, 2), p0, p0, replicas_only=True)
    assert torch.equal(red, torch.zeros(3, 2)) and st == CommStats(0, 0), "no replica: zeros"
    grad = x.clone()
    none_RS = torch.zeros(0, 2)
    red, _ = sparse_reduce_scatter(none_RS, p0, p0, replicas_only=True, out=grad, accumulate=True)
    assert red is grad and torch.equal(grad, x), "accumulate adds nothing"
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        sparse_reduce_scatter(x, p0, p0, accumulate=True)
    with pytest.raises(ValueError, match=r"expects input \[0, S\] \(placement_from.held\(0\) - "):
        sparse_reduce_scatter(x, p0, p0, replicas_only=True)
    with pytest.raises(ValueError, match="chosen for other placements"):
        two = Placement.from_owners([0, 0], 1)
        sparse_all_gather(x, p0, p0, algorithm=choose(two, two, expert_bytes=8))


def test_collectives_import_no_runtime() -> None:
    for path in COLLECTIVES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            bad = [m for m in mods if m.split(".")[0] in ("fssdp", "launch", "models")]
            assert not bad, f"{path.name} imports {bad}"
