"""The host-array helpers of the control plane (fssdp/segments.py, fssdp/host.py) against
loop references on random inputs, and the host view of a placement against its tensors."""

from __future__ import annotations

import random

import numpy as np
import torch

from collectives.placement import Placement, Topology
from fssdp.host import add_at, host
from fssdp.planner import plan_placement
from fssdp.segments import excl_cumsum, lengths, overlaps_small, rank_in_runs
from fssdp.sharding import contiguous_sharding


def _overlaps_loop(a_len: list[int], b_len: list[int]) -> list[tuple[int, int, int]]:
    """Two pointers, one unit step at a time: (a index, b index, units) of every overlap."""
    out: list[tuple[int, int, int]] = []
    a = [i for i, n in enumerate(a_len) for _ in range(n)]
    b = [j for j, n in enumerate(b_len) for _ in range(n)]
    for i, j in zip(a, b):
        if out and out[-1][:2] == (i, j):
            out[-1] = (i, j, out[-1][2] + 1)
        else:
            out.append((i, j, 1))
    return out


def test_overlaps_small_matches_two_pointers() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a_len = [rng.choice([0, 0, 1, 2, 5, 9]) for _ in range(rng.randint(1, 8))]
        total = sum(a_len)
        cuts = sorted(rng.randint(0, total) for _ in range(rng.randint(0, 6)))
        b_len = [y - x for x, y in zip([0, *cuts], [*cuts, total])]
        ia, ib, n = overlaps_small(np.cumsum(a_len), np.cumsum(b_len))
        assert list(zip(ia.tolist(), ib.tolist(), n.tolist())) == _overlaps_loop(a_len, b_len)


def test_rank_in_runs_counts_predecessors_in_each_run() -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        keys = np.sort(rng.integers(0, 4, rng.integers(0, 12)))
        counted = rng.integers(0, 2, keys.size).astype(bool)
        got, got_c = rank_in_runs(keys), rank_in_runs(keys, counted)
        for i, k in enumerate(keys.tolist()):
            before = [j for j in range(i) if keys[j] == k]
            assert got[i] == len(before)
            assert got_c[i] == sum(bool(counted[j]) for j in before)


def test_prefix_helpers_and_add_at() -> None:
    x = np.array([3, 0, 4, 1], dtype=np.int64)
    assert excl_cumsum(x).tolist() == [0, 3, 3, 7]
    assert lengths(np.cumsum(x)).tolist() == x.tolist()
    out = add_at(3, np.array([2, 0, 2, 2]), np.array([1, 5, -2, 7]))
    assert out.tolist() == [5, 0, 6] and out.dtype == np.int64


def test_host_view_matches_the_placement() -> None:
    topo = Topology(8, 4)
    own = Placement.from_owners(contiguous_sharding(16, 8), 8)
    p = plan_placement([float(16 - e) ** 2 for e in range(16)], own, topo, 4, 2)
    hp = host(p)
    assert host(p) is hp  # made once per placement
    pe, pr = p.pairs_P()
    assert hp.expert_P.tolist() == pe.tolist() and hp.rank_P.tolist() == pr.tolist()
    assert np.array_equal(hp.holders_EW, p.holders_EW().numpy())
    assert hp.replicas_W.tolist() == p.replicas_W().tolist()
    assert hp.replicas_W.sum() > 0  # the case has replicas to count
    assert hp.cell_P.tolist() == p.cells_P().tolist()
    assert torch.equal(torch.from_numpy(hp.owner_E), p.owner_E)
