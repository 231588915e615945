"""Deterministic (not timed): on the same skewed batches fssdp balances expert work better than
ep, and its sparse all-gather moves fewer bytes than fsdp gathers for the experts."""

from __future__ import annotations

from typing import Any

import pytest

from launch.gather import all_gather_rows
from tests.support.harness import run_distributed
from tests.support.parity import train_capture

# The balancing plan itself, every step: with the cost gate on (the default), exact mode on
# these tiny experts finds the rows it would level cheaper than one copy and runs as EP
# ([Note: when replication pays] in fssdp/policy.py; tests/unit/test_cost_gate.py).
SKEWED = [
    "model.route_skew=0.5",
    "train.dtype=float32",
    "parallel.overlap_degree=2",
    "parallel.cost_aware=false",
]
STEPS = 3


def _probe(trainer: Any) -> dict[str, Any]:
    par = trainer.par
    m = par.local_metrics()
    kinds = sorted(m.comm_bytes)
    mine = [m.rows_computed, *(m.comm_bytes[k] for k in kinds)]
    rows = all_gather_rows(mine, trainer.info.device)
    total = {k: sum(r[1 + i] for r in rows) for i, k in enumerate(kinds)}
    return {"rows": [r[0] for r in rows], "bytes": total}


def _run(rank: int, world: int) -> dict[str, Any]:
    return {
        s: train_capture(rank, world, [*SKEWED, f"parallel={s}"], STEPS, probe=_probe)["probe"]
        for s in ("fssdp", "ep", "fsdp")
    }


def _imbalance(rows: list[float]) -> float:
    return max(rows) / (sum(rows) / len(rows))


@pytest.mark.parametrize("world", [pytest.param(w, marks=pytest.mark.slow) for w in (2, 4)])
def test_fssdp_balances_better_than_ep_and_moves_less_than_fsdp(world: int) -> None:
    got = run_distributed(_run, world)[0]
    fssdp, ep, fsdp = got["fssdp"], got["ep"], got["fsdp"]
    assert sum(fssdp["rows"]) == sum(ep["rows"]) > 0  # same work, split differently
    assert _imbalance(fssdp["rows"]) < _imbalance(ep["rows"]), (fssdp["rows"], ep["rows"])
    assert _imbalance(ep["rows"]) > 1.3, ep["rows"]  # the batch really is skewed
    # The straggler target (<= 1.1), by rows, under the default exact planning (predict mode,
    # planning from the previous steps' loads, gives 1.53 here at world 2).
    assert _imbalance(fssdp["rows"]) <= 1.1, fssdp["rows"]
    assert 0 < fssdp["bytes"]["spag"] < fsdp["bytes"]["fsdp_expert_gather"], (fssdp, fsdp)
