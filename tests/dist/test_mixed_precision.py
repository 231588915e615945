"""`train.dtype=bfloat16` as FSDP2 users know it ([Note: mixed precision of experts] in
fssdp/precision.py): gpt_moe and umoe train under fssdp (the loss falls), gpt_moe under fsdp,
every family in the slow test; the master weights and the optimizer state stay fp32; the spAG
moves half the bytes of the same placement in float32 (the comm_bytes the metrics log)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.support.harness import run_distributed
from tests.support.parity import train_capture

STEPS = 5
FAMILIES = {
    "gpt_moe": ["model=gpt_moe_tiny"],
    "moeut": ["model=moeut_tiny"],
    "sut": ["model=sut_tiny"],
    "umoe": ["model=umoe_tiny"],
    "jamba": ["model=jamba_tiny"],
}
BF16 = ["train.dtype=bfloat16", "optim.lr=3e-3"]
# Heavy skew: the same hot experts, so the same placement, in float32 and bfloat16
SKEWED = ["model=gpt_moe_tiny", "model.route_skew=3.0", "parallel=fssdp"]


def _dtypes(trainer: Any) -> dict[str, Any]:
    """What the step moved, and the dtypes of what the optimizer holds."""
    par = trainer.par
    params = [p for g in trainer.opt.param_groups for p in g["params"]]
    state = [v for st in trainer.opt.state.values() for v in st.values()
             if isinstance(v, torch.Tensor) and v.ndim]  # fmt: skip
    return {
        "comm": dict(par.local_metrics().comm_bytes),
        "param_dtypes": {str(p.dtype) for p in params},
        "state_dtypes": {str(v.dtype) for v in state},
    }


def _run(rank: int, world: int, families: list[str]) -> dict[str, Any]:
    out = {f"{f}/fssdp": train_capture(rank, world, [*FAMILIES[f], "parallel=fssdp", *BF16], STEPS)
           for f in families}  # fmt: skip
    out["gpt_moe/fsdp"] = train_capture(
        rank, world, ["model=gpt_moe_tiny", "parallel=fsdp", *BF16], STEPS
    )
    for dtype in ("float32", "bfloat16"):
        out[f"bytes/{dtype}"] = train_capture(
            rank, world, [*SKEWED, f"train.dtype={dtype}"], 1, probe=_dtypes
        )
    return out


def _check(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]
    for name, cap in got.items():
        if name.startswith("bytes/"):
            continue
        losses = cap["loss"]
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        assert losses[-1] < losses[0] - 0.05, (name, losses)  # it trains
    spag = {d: sum(r[f"bytes/{d}"]["probe"]["comm"]["spag"] for r in ranks)
            for d in ("float32", "bfloat16")}  # fmt: skip
    assert spag["float32"] > 0 and spag["bfloat16"] == spag["float32"] / 2, spag
    probe = got["bytes/bfloat16"]["probe"]  # fp32 master weights and optimizer state
    assert probe["param_dtypes"] == {"torch.float32"} == probe["state_dtypes"], probe


@pytest.mark.slow
def test_bf16_trains_and_halves_the_spag_bytes() -> None:
    _check(run_distributed(_run, 2, ["gpt_moe", "umoe"], timeout_s=600))


@pytest.mark.slow
def test_bf16_trains_every_family() -> None:
    _check(run_distributed(_run, 2, list(FAMILIES), timeout_s=900))
