"""Every family of the zoo under `parallel=fssdp` at world 2 equals `parallel=none` at world 1
(float64, ≤1e-9 relative, 3 optimizer steps): losses, aux losses and every gradient."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.harness import run_distributed
from tests.support.parity import assert_matches, train_capture
from tests.support.shared import shared

STEPS = 3
FAMILIES = {
    "moeut": ["model=moeut_tiny", "model.route_skew=0.5"],
    "sut": ["model=sut_tiny"],
    "umoe": ["model=umoe_tiny", "model.route_skew=0.5"],
    "jamba": ["model=jamba_tiny", "model.route_skew=0.5"],
    "gpt_moe": ["model=gpt_moe_tiny", "model.route_skew=0.5"],
}
FSSDP = ["parallel=fssdp", "parallel.rematerialize=true"]


def _all(rank: int, world: int, strategy: list[str]) -> dict[str, Any]:
    return {f: train_capture(rank, world, [*ov, *strategy], STEPS) for f, ov in FAMILIES.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return shared(
        tmp_path_factory, "zoo-parity-ref", lambda _: run_distributed(_all, 1, ["parallel=none"])[0]
    )


@pytest.mark.slow
def test_every_family_matches_under_fssdp(reference: dict[str, Any]) -> None:
    got = run_distributed(_all, 2, FSSDP, timeout_s=300)[0]
    for family in FAMILIES:
        assert_matches(reference[family], got[family], 1e-9, f"{family} fssdp world 2")
        assert len(reference[family]["grads"][0]) > 5
