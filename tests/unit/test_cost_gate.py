"""Exact mode's cost gate ([Note: when replication pays] in fssdp/policy.py): replicate only where
the rows taken off the busiest rank cost more time than the copies; otherwise the bank runs as EP
(ownership placement, nothing planned, nothing moved). Single process.

Legend: W ranks, E experts, m extra slots per rank; copy_s = expert_bytes / bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from collectives.placement import Placement, Topology
from fssdp.assign import assign_tokens, rows_per_rank
from fssdp.planner import calibrate, plan_exact, plan_exact_if_it_pays
from fssdp.policy import AgreedTiming, ExactPolicy
from fssdp.sharding import contiguous_sharding

W, E, M = 8, 16, 2
TOPO = Topology(W, 4)
OWN = Placement.from_owners(contiguous_sharding(E, W), W)
BYTES, BW = 1 << 20, 1e9  # one copy: ~1.05 ms


def busiest(counts: torch.Tensor, p: Placement) -> int:
    return max(rows_per_rank(counts, assign_tokens(counts, p, TOPO)))


def counts_of(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "balanced":
        return torch.full((W, E), 100, dtype=torch.int64)
    if kind == "all_to_one":
        c = torch.zeros(W, E, dtype=torch.int64)
        c[:, 5] = 400
        return c
    if kind == "empty":
        return torch.zeros(W, E, dtype=torch.int64)
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5  # zipf: expert 0 hottest
    idx_WN = torch.multinomial(p, W * 2000, True, generator=g).view(W, 2000)
    return torch.zeros(W, E, dtype=torch.int64).scatter_add_(1, idx_WN, torch.ones_like(idx_WN))


@pytest.mark.parametrize("kind", ["balanced", "empty"])
def test_nothing_to_level_is_the_ownership_placement(kind: str) -> None:
    got = plan_exact_if_it_pays(counts_of(kind), OWN, TOPO, M, BYTES, BW, 1e-3)
    assert got is OWN  # not even planned


@pytest.mark.parametrize("kind", ["zipf", "all_to_one"])
def test_cheap_copies_replicate_as_calibrate_prices_them(kind: str) -> None:
    counts = counts_of(kind)
    tpr = 1e-5  # a row costs 10 us: the excess dwarfs one 1 ms copy
    got = plan_exact_if_it_pays(counts, OWN, TOPO, M, BYTES, BW, tpr)
    assert got == calibrate(OWN, counts, TOPO, M, BYTES, BW, tpr)
    assert busiest(counts, got) < busiest(counts, OWN)
    assert OWN.is_subset_of(got) and got.owner == OWN.owner


@pytest.mark.parametrize("kind", ["zipf", "all_to_one"])
def test_dear_copies_keep_the_ownership_placement(kind: str) -> None:
    counts = counts_of(kind)
    rows = busiest(counts, OWN) - -(-int(counts.sum()) // W)  # the most replication could save
    tpr = 0.99 * (BYTES / BW) / rows  # the best case saves a bit less than one copy
    assert plan_exact_if_it_pays(counts, OWN, TOPO, M, BYTES, BW, tpr) is OWN
    # just above the gate the plan is priced; never worse than ownership in rows
    got = plan_exact_if_it_pays(counts, OWN, TOPO, M, BYTES, BW, 1.01 * (BYTES / BW) / rows)
    assert busiest(counts, got) <= busiest(counts, OWN)


def test_policy_plans_as_before_until_timed_then_gates() -> None:
    counts = counts_of("zipf")
    pol = ExactPolicy(OWN, TOPO, M, cost_aware=True, row_bytes=BYTES, bandwidth=BW)
    assert pol.timed
    assert pol.after_routing(counts, None) == plan_exact(counts, OWN, TOPO, M)  # step 1
    pol.end_step(counts.sum(0), AgreedTiming(0.0, 1e-12))  # rows nearly free: never pays
    assert pol.after_routing(counts, None) is OWN
    pol.end_step(counts.sum(0), AgreedTiming(0.0, 1e-5))
    assert pol.after_routing(counts, None) != OWN
    off = ExactPolicy(OWN, TOPO, M)  # cost_aware off: the balancing plan, untimed
    assert not off.timed and off.after_routing(counts, None) == plan_exact(counts, OWN, TOPO, M)
