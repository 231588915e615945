"""Expert ownership layouts (fssdp.sharding): pure, single process.

Legend: W ranks, E_b experts of bank b, N = Σ_b E_b slots.
"""

from __future__ import annotations

import random

import pytest
import torch

from collectives.placement import Topology
from fssdp.sharding import (
    balanced_uniform_sharding,
    contiguous_sharding,
    heterogeneous_sharding,
    moves,
    sharding_changed,
    slot_counts,
)


def slots_per_rank(owners: dict[str, list[int]], W: int) -> list[int]:
    used = [0] * W
    for owner in owners.values():
        for r in owner:
            used[r] += 1
    return used


def bank_imbalance(load: list[float], owner: list[int], W: int) -> float:
    per_rank = [0.0] * W
    for e, r in enumerate(owner):
        per_rank[r] += load[e]
    return max(per_rank) / (sum(per_rank) / W)


def test_contiguous_and_slot_counts() -> None:
    assert contiguous_sharding(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert contiguous_sharding(2, 4) == [0, 2]  # E < W: ranks 1 and 3 own nothing
    assert contiguous_sharding(0, 4) == []
    assert slot_counts(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="world_size >= 1"):
        contiguous_sharding(4, 0)


def test_balanced_uniform() -> None:
    topo = Topology(4, 2)
    assert balanced_uniform_sharding({"a": 8}, topo) == {"a": contiguous_sharding(8, 4)}
    out = balanced_uniform_sharding({"b": 5, "a": 6, "c": 1}, topo)
    assert slots_per_rank(out, 4) == slot_counts(12, 4)
    assert sorted(out) == ["a", "b", "c"] and [len(out[b]) for b in "abc"] == [6, 5, 1]
    for owner in out.values():
        assert owner == sorted(owner), "contiguous blocks per bank"


def random_loads(rng: random.Random, banks: int) -> dict[str, list[float]]:
    return {
        f"layers.{i}": [rng.paretovariate(1.2) for _ in range(rng.choice([3, 4, 8, 12]))]
        for i in range(banks)
    }


@pytest.mark.parametrize(("W", "rpn"), [(1, 1), (2, 1), (4, 2), (6, 3), (8, 4)])
def test_heterogeneous_slots_and_owners(W: int, rpn: int) -> None:
    rng = random.Random(W)
    topo = Topology(W, rpn)
    for _ in range(10):
        loads = random_loads(rng, rng.randint(1, 4))
        aside = {b: rng.randint(0, len(v)) for b, v in loads.items()}
        out = heterogeneous_sharding(loads, topo, aside)
        assert sorted(out) == sorted(loads)
        for b in loads:  # exactly one owner per expert, in range
            assert len(out[b]) == len(loads[b]) and all(0 <= r < W for r in out[b])
        N = sum(len(v) for v in loads.values())
        assert slots_per_rank(out, W) == slot_counts(N, W)
        assert out == heterogeneous_sharding(loads, topo, aside), "deterministic"


def test_heterogeneous_spreads_load_better_than_contiguous() -> None:
    topo = Topology(4, 2)
    skew = [1 / (e + 1) ** 1.5 for e in range(16)]  # hot experts share a contiguous block
    out = heterogeneous_sharding({"a": skew, "b": skew[::-1]}, topo, {})
    for load in (skew, skew[::-1]):
        name = "a" if load is skew else "b"
        assert bank_imbalance(load, out[name], 4) < bank_imbalance(
            load, contiguous_sharding(16, 4), 4
        )
    # Expert 0 alone is 43% of the load; LPT puts it first and gives its rank the lightest rest.
    per_rank = [sum(skew[e] for e in range(16) if out["a"][e] == r) for r in range(4)]
    assert max(per_rank) < skew[0] + 3 * skew[-1] + 1e-9


def test_set_aside_placed_last() -> None:
    topo = Topology(2, 1)
    loads = [100.0, 5.0, 4.0, 3.0]
    # Without set-aside the hot expert goes first, to rank 0, and the rest balance against it.
    assert heterogeneous_sharding({"a": loads}, topo, {"a": 0}) == {"a": [0, 1, 1, 0]}
    # Set aside, the rest balance among themselves (5 | 4+3) and expert 0 takes the last slot.
    assert heterogeneous_sharding({"a": loads}, topo, {"a": 1}) == {"a": [0, 0, 1, 1]}
    # Set-aside experts of all banks, heaviest first, fill what the others leave.
    out = heterogeneous_sharding(
        {"a": [9.0, 1.0, 1.0], "b": [1.0, 8.0, 1.0]}, Topology(3, 1), {"a": 1, "b": 1}
    )
    # Rest: a1 -> 0, a2 -> 1, b0 -> 2, b2 -> 0 (rank 0 full); then a0 (9) and b1 (8) take the
    # two free slots, each on the rank with less of its own bank's load.
    assert out == {"a": [2, 0, 1], "b": [2, 1, 0]}


def test_heterogeneous_bank_order_and_tensor_loads() -> None:
    topo = Topology(2, 1)
    # Bank "b" has the heaviest expert, so it goes first (9 -> rank 0, 2 -> rank 1); bank "a"
    # then ties on its own load and breaks the tie by all banks' load: 3 -> rank 1.
    out = heterogeneous_sharding({"a": torch.tensor([3.0, 1.0]), "b": [9.0, 2.0]}, topo, {})
    assert out == {"b": [0, 1], "a": [1, 0]}
    with pytest.raises(ValueError, match=r"unknown banks \['zz'\]"):
        heterogeneous_sharding({"a": [1.0]}, topo, {"zz": 1})
    with pytest.raises(ValueError, match="must be >= 0"):
        heterogeneous_sharding({"a": [1.0]}, topo, {"a": -1})


def test_moves_and_changed() -> None:
    old = {"a": [0, 0, 1, 1], "b": [1, 0]}
    new = {"a": [0, 1, 1, 0], "b": [1, 0]}
    assert moves(old["a"], new["a"]) == [(1, 0, 1), (3, 1, 0)]
    assert moves(old["b"], new["b"]) == []
    assert sharding_changed(old, new) and not sharding_changed(
        old, {k: list(v) for k, v in old.items()}
    )
    assert sharding_changed(old, {"a": old["a"]})
    with pytest.raises(ValueError, match="expert count cannot change"):
        moves([0, 1], [0])
