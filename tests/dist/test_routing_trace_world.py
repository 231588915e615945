"""`train.routing_trace=true` at world 2: rank 0's trace rows are the steps' global tokens per
expert (format: launch/routing_trace.py)."""

from __future__ import annotations

from typing import Any

import torch

from launch.routing_trace import read_trace
from models.common.experts import ExpertBank
from models.registry import build_model, preset
from tests.support.harness import run_distributed
from tests.support.parity import train_capture


def _read(trainer: Any) -> Any:
    path = trainer.run_dir / "routing_trace.jsonl"
    return read_trace(path) if trainer.info.is_main else path.exists()

STEPS = 3


def _traced(rank: int, world: int) -> dict[str, Any]:
    ov = ["parallel=fssdp", "model.route_skew=1.0", "train.routing_trace=true"]
    return train_capture(rank, world, ov, STEPS, probe=_read)


def test_trace_holds_every_steps_global_load() -> None:
    res = run_distributed(_traced, 2, timeout_s=300)
    assert res[1]["probe"] is False  # only rank 0 writes
    trace = res[0]["probe"]
    h = trace.header
    assert (h["model"], h["world_size"], h["tokens_per_step"], h["top_k"]) == (
        "gpt_moe",
        2,
        8 * 32,
        2,
    )
    plain = build_model(preset("gpt_moe_tiny")).to(torch.float64)
    banks = [m for m in plain.modules() if isinstance(m, ExpertBank)]
    assert set(h["banks"]) == {b.bank_name for b in banks}
    for b in banks:
        one_expert = sum(p[0].numel() * p.element_size() for p in b.parameters(recurse=False))
        meta = h["banks"][b.bank_name]
        assert meta == {"num_experts": 8, "expert_bytes": one_expert, "rows_per_token": 2.0}
    assert trace.steps == res[0]["load"]  # the trainer's per-step global load, step by step
    assert len(trace.steps) == STEPS and all(sum(c) > 0 for c in trace.steps[0].values())


