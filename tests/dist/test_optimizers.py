"""torch optimizers over the strategies' parameters (FSDP2 DTensors beside plain expert rows).

Parity of foreach SGD and fused AdamW through re-sharding is in test_strategy_parity; here: the
param groups multi-tensor kernels need, and the one-line refusal of Adafactor on DTensors.
"""

from __future__ import annotations

from typing import Any

import pytest
from torch.distributed.tensor import DTensor

from launch.errors import UserError
from tests.support.harness import run_distributed
from tests.support.parity import train_capture
from tests.support.shared import shared


def _groups(trainer: Any) -> list[tuple[int, set[bool]]]:
    return [
        (len(g["params"]), {isinstance(p, DTensor) for p in g["params"]})
        for g in trainer.opt.param_groups
    ]


def _cases(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ov in {
        "fssdp_foreach": ["parallel=fssdp", "optim.impl=foreach"],
        "fssdp_single": ["parallel=fssdp"],
        "ddp_adafactor": ["parallel=ddp", "optim=adafactor"],
    }.items():
        out[name] = train_capture(rank, world, ov, 2, probe=_groups)
    try:
        train_capture(rank, world, ["parallel=fsdp", "optim=adafactor"], 1)
        out["fsdp_adafactor"] = None
    except UserError as e:
        out["fsdp_adafactor"] = str(e)
    return out


pytestmark = pytest.mark.slow  # ~10 s; the parity of these optimizers is in test_strategy_parity


@pytest.fixture(scope="module")
def got(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    make = lambda _: run_distributed(_cases, 2, timeout_s=300)[0]  # noqa: E731
    return shared(tmp_path_factory, "optimizer-cases", make)


def test_multi_tensor_kernels_get_groups_of_one_kind(got: dict[str, Any]) -> None:
    groups = got["fssdp_foreach"]["probe"]
    # decay and no-decay, DTensors (the dense part) first, then the expert rows
    assert [kinds for _, kinds in groups] == [{True}, {True}, {False}, {False}], groups
    assert len(got["fssdp_single"]["probe"]) == 2  # the layout earlier checkpoints hold


def test_adafactor_trains_under_ddp_and_is_refused_on_dtensors_in_one_line(
    got: dict[str, Any],
) -> None:
    losses = got["ddp_adafactor"]["loss"]
    assert all(x == x for x in losses) and len(losses) == 2
    msg = got["fsdp_adafactor"]
    assert msg is not None and "optim.name=adafactor" in msg and "\n" not in msg, msg
