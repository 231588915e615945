"""Checks shared by the phase-timing tests (unit world 1, dist every strategy)."""

from __future__ import annotations

from typing import Any

BANK_CALLS = 4  # gpt_moe_tiny: one bank and one router per layer, 4 layers


# -- real steps --------------------------------------------------------------
def timed_record(trainer: Any) -> dict[str, Any]:
    trainer.cfg.log_every = 1  # the next step is logged, so timed
    out = trainer.train_step()
    return trainer._record(out)


STRATEGIES = {
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "ep": ["parallel=ep", "model.route_skew=1.0"],
    "fssdp": ["parallel=fssdp", "model.route_skew=1.0", "parallel.rematerialize=true"],
}




def _inside(span: list[Any], outer: list[Any]) -> bool:
    return outer[1] <= span[1] and span[2] <= outer[2] + 1e-9 and span[3] > outer[3]


def check_spans(rank_spans: list[list[Any]], label: str) -> None:
    top = {s[0]: s for s in rank_spans if s[3] == 0}
    assert {"forward", "backward", "optimizer"} <= set(top), (label, sorted(top))
    for s in rank_spans:
        assert 0.0 <= s[1] <= s[2], (label, s)
    fwd, bwd = top["forward"], top["backward"]
    experts = [s for s in rank_spans if s[0] == "expert"]
    assert sum(_inside(s, fwd) for s in experts) == BANK_CALLS, (label, experts)
    assert sum(_inside(s, bwd) for s in experts) == BANK_CALLS, (label, experts)
    routers = [s for s in rank_spans if s[0] == "router"]
    assert len(routers) == BANK_CALLS and all(_inside(s, fwd) for s in routers), label
