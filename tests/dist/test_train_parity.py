"""`parallel=ddp` at world 2 and 4 equals `parallel=none` at world 1, step by step (float64)."""

from __future__ import annotations

import pytest

from tests.support.harness import run_distributed
from tests.support.parity import assert_matches, train_capture
from tests.support.shared import shared

STEPS = 4
CASES = {
    "natural": [],
    "skewed": ["model.route_skew=3.0"],
}


def _all_cases(rank: int, world: int, strategy: str) -> dict:
    return {
        name: train_capture(rank, world, [f"parallel={strategy}", *ov], STEPS)
        for name, ov in CASES.items()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return shared(
        tmp_path_factory, "train-parity-ref", lambda _: run_distributed(_all_cases, 1, "none")[0]
    )


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ddp_matches_single_process(reference: dict, world: int) -> None:
    got = run_distributed(_all_cases, world, "ddp")[0]
    for name in CASES:
        assert_matches(reference[name], got[name], 1e-9, f"ddp world {world} {name}")


def test_reference_is_sensitive(reference: dict) -> None:
    """The comparison can fail: routing skew changes both the losses and the load."""
    assert reference["natural"]["loss"] != reference["skewed"]["loss"]
    load = reference["skewed"]["load"][0]["blocks.0.moe.experts"]
    assert load[0] > 3 * load[-1], load
