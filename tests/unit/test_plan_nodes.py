"""[Note: node-first rows] and [Note: grouped rooms] (fssdp/plan_nodes.py).

Legend: W ranks, R ranks per node, N nodes, E experts, m extra slots per rank. The rows each
node's holders start with; the estimate of rows leaving their node against the assignment
itself, for every candidate; what the grouped rooms are for (skewed counts with node-local
replicas: fewer rows across nodes, balance kept) against the planner without them.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from collectives.placement import Placement, Topology
from fssdp import plan_exact as pe
from fssdp import plan_nodes
from fssdp.assign import assign_tokens, rows_per_rank
from fssdp.host import host
from fssdp.plan_local import Locality, node_local_replicas
from fssdp.plan_nodes import cross_node_rows, node_first_rows, node_shortfall, rows_by_node
from fssdp.planner import plan_exact
from fssdp.quotas import holder_rows
from fssdp.sharding import balanced_uniform_sharding
from perf.bench_planner_cases import zipf_counts
from tests.unit.test_plan_local import cross_node_rows as crossing
from tests.unit.test_plan_local import multinode_case


def skewed(W: int, E: int, seed: int) -> torch.Tensor:
    """Zipf-2 popularity at random expert ids, noise per source rank."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / (torch.arange(E, dtype=torch.float64) + 1) ** 2.0
    w = w[torch.randperm(E, generator=g)]
    p = w * torch.exp(0.3 * torch.randn(W, E, generator=g, dtype=torch.float64))
    return (p / p.sum(1, keepdim=True) * 4096).floor().to(torch.int64)


def random_base(rng: random.Random) -> tuple[torch.Tensor, Placement, Topology, int]:
    shapes = ((4, 2), (6, 3), (8, 2), (8, 4), (12, 4), (16, 4), (16, 8))
    counts, own, topo, m = multinode_case(rng, shapes, max_experts=20)
    if rng.random() < 0.7:  # node-local replicas, as exact mode starts from them
        own = node_local_replicas(counts, own, topo, Locality(rng.choice([1, 4]), 50, m - 1))
    return counts, own, topo, m


@pytest.mark.parametrize("seed", range(6))
def test_node_first_rows_start_each_node_with_its_own_rows(seed: int) -> None:
    """Each (expert, node) with a holder gets that node's rows (the owner's node also those of
    nodes without a holder), split within one among its holders; every expert's rows sum."""
    rng = random.Random(seed)
    counts, base, topo, _ = random_base(rng)
    hp = host(base)
    rows_P = node_first_rows(rows_by_node(counts.numpy(), topo), hp, topo)
    W, E = counts.shape
    N, R = topo.num_nodes, topo.ranks_per_node
    assert (rows_P >= 0).all()
    assert np.bincount(hp.expert_P, rows_P, E).tolist() == counts.sum(0).tolist()
    c_EN = counts.view(N, R, E).sum(1).T
    for e in range(E):
        held = [n for n in range(N) if ((hp.expert_P == e) & (hp.rank_P // R == n)).any()]
        orphans = sum(int(c_EN[e, n]) for n in range(N) if n not in held)
        for n in held:
            sel = (hp.expert_P == e) & (hp.rank_P // R == n)
            want = int(c_EN[e, n]) + (orphans if int(hp.owner_E[e]) // R == n else 0)
            assert int(rows_P[sel].sum()) == want
            assert int(rows_P[sel].max() - rows_P[sel].min()) <= 1


@pytest.mark.parametrize("dense", [0, 10**9])
@pytest.mark.parametrize("seed", range(40))
def test_cross_estimate_is_the_assignments_for_every_candidate(
    seed: int, dense: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cross_node_rows` of each candidate equals the rows the dispatcher then sends to
    another node under that candidate's placement (planned rows, fssdp/fill.py), by sorted
    keys and by the dense sum alike."""
    monkeypatch.setattr(plan_nodes, "DENSE_PER_KEY", dense)
    rng = random.Random(1000 + seed)
    counts, base, topo, m = random_base(rng)
    cuts = pe.cut(counts, base, topo, m, rows_by_node(counts.numpy(), topo))
    B = cuts.rows_BW.shape[0]
    moves = (cuts.b_S, cuts.e_S, cuts.u_S, cuts.src_S, cuts.n_S)
    short_G = node_shortfall(rows_by_node(counts.numpy(), topo), host(base), topo, cuts.base_P)
    est = cross_node_rows(short_G, topo, moves, np.arange(B))
    for b in range(B):
        p = pe.placement_from(cuts, (cuts.b_S == b) & (cuts.n_S > 0), base, counts)
        assert int(est[b]) == crossing(counts, p, topo), b
        got = rows_per_rank(counts, assign_tokens(counts, p, topo))
        assert max(got) == int(cuts.rows_BW[b].max()), b


@pytest.mark.parametrize("dense", [0, 10**9])
@pytest.mark.parametrize("seed", range(60))
def test_the_winner_is_the_cheapest_candidate_on_either_path(
    seed: int, dense: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan_exact_t` picks the first candidate of least busiest rank * N + rows leaving
    their node, over all candidates, whether it prices every candidate in one pass or only
    those under the first one's bound (`dense` forces either). (The bound once skipped the
    candidates tied with it, which could then win the tie on their busiest rank alone.)"""
    monkeypatch.setattr(pe, "DENSE_PER_KEY", dense)
    if seed < 2:  # two Zipf-2 cases on 2 nodes of 2 where that tie happened
        counts, topo, m = zipf_counts(4, 8, 2.0, 3 * seed), Topology(4, 2), 3
        own = Placement.from_owners(balanced_uniform_sharding({"b": 8}, topo)["b"], 4)
        base = node_local_replicas(counts, own, topo, Locality(64, 20000, 2))
    else:
        counts, base, topo, m = random_base(random.Random(3000 + seed))
    c_G = rows_by_node(counts.numpy(), topo)
    cuts = pe.cut(counts, base, topo, m, c_G)
    B, N = cuts.rows_BW.shape[0], topo.num_nodes
    moves = (cuts.b_S, cuts.e_S, cuts.u_S, cuts.src_S, cuts.n_S)
    short_G = node_shortfall(c_G, host(base), topo, cuts.base_P)
    full_B = cuts.rows_BW.max(1) * N + cross_node_rows(short_G, topo, moves, np.arange(B))
    best = int(np.argmin(full_B))
    want = pe.placement_from(cuts, (cuts.b_S == best) & (cuts.n_S > 0), base, counts)
    got = pe.plan_exact_t(counts, base, topo, m)
    assert got.pairs_P()[0].tolist() == want.pairs_P()[0].tolist()
    assert got.pairs_P()[1].tolist() == want.pairs_P()[1].tolist()
    assert got.planned.rows_P.tolist() == want.planned.rows_P.tolist()


@pytest.mark.parametrize("seed", range(40))
def test_busiest_rank_never_above_the_mean_or_the_node_first_start(seed: int) -> None:
    """Whichever candidate the cost rule picks, its busiest rank is at most the mean (rounded
    up) or the busiest rank of the node-first rows it starts from, and it keeps the cap."""
    rng = random.Random(2000 + seed)
    counts, base, topo, m = random_base(rng)
    p = pe.plan_exact_t(counts, base, topo, m)
    hb, W = host(base), counts.shape[0]
    c_G = rows_by_node(counts.numpy(), topo)
    start = counts.sum(0).numpy() if base.is_ownership_only() else node_first_rows(c_G, hb, topo)
    before = int(np.bincount(hb.rank_P, start, W).max())
    lam = -(-int(counts.sum()) // W)
    got = rows_per_rank(counts, assign_tokens(counts, p, topo))
    assert max(got) <= max(lam, before), (max(got), lam, before)
    assert (host(p).replicas_W <= np.maximum(m, hb.replicas_W)).all()


def test_grouped_rooms_send_fewer_rows_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skewed counts, 4 nodes of 8, node-local replicas: the planner with node-first rows,
    grouped rooms and the cost rule (busiest rank * N + rows leaving their node) against the
    one without them (even split of the base, dealt and node-blind rooms, the busiest rank
    alone deciding: the previous planner), 12 seeds, measured on the assignments: a quarter
    fewer rows across nodes, the cost 5% lower in all and never 2% higher (its base rows are
    not the previous planner's, so the previous candidates are not among its own)."""
    W, R, E = 32, 8, 32
    topo = Topology(W, R)
    own = Placement.from_owners([e % W for e in range(E)], W)
    loc = Locality(4, 3000, 1)
    new_cross, old_cross, new_cost, old_cost = [], [], [], []

    def cost(counts: torch.Tensor, p: Placement) -> int:
        busiest = max(rows_per_rank(counts, assign_tokens(counts, p, topo)))
        return busiest * (W // R) + crossing(counts, p, topo)

    for seed in range(12):
        counts = skewed(W, E, seed)
        new = plan_exact(counts, own, topo, 2, loc)
        base = node_local_replicas(counts, own, topo, loc)
        with monkeypatch.context() as mp:
            mp.setattr(pe, "WITH_GROUPED", pe.WITH_DEALT)
            even = lambda _, hb, t, b=base, k=counts: holder_rows(k, b, t)  # noqa: E731
            mp.setattr(pe, "node_first_rows", even)
            mp.setattr(pe, "cross_node_rows", lambda *a: np.zeros(a[-1].size, dtype=np.int64))
            old = plan_exact(counts, own, topo, 2, loc)
        new_cost.append(cost(counts, new))
        old_cost.append(cost(counts, old))
        new_cross.append(crossing(counts, new, topo))
        old_cross.append(crossing(counts, old, topo))
    assert sum(new_cross) < 0.75 * sum(old_cross), (new_cross, old_cross)
    assert sum(new_cost) < 0.95 * sum(old_cost), (new_cost, old_cost)
    assert all(n <= 1.02 * o for n, o in zip(new_cost, old_cost)), (new_cost, old_cost)
