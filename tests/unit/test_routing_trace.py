"""Routing trace files: a resumed run's trace drops the rolled-back steps
(format: launch/routing_trace.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.profile import TraceRecorder
from launch.routing_trace import read_trace


def test_resumed_trace_drops_rolled_back_steps(tmp_path: Path) -> None:
    rec = TraceRecorder(tmp_path, torch.nn.Linear(1, 1), 2, 16)
    load = {"bank": torch.tensor([3, 1])}
    for step in (1, 2, 3, 4):
        rec.record(step, load)
    again = TraceRecorder(tmp_path, torch.nn.Linear(1, 1), 4, 16)  # resumed after step 2
    again.record(3, {"bank": torch.tensor([0, 4])})
    lines = (tmp_path / "routing_trace.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["world_size"] == 2  # the header is kept
    assert [json.loads(x)["step"] for x in lines[1:]] == [1, 2, 3]
    assert read_trace(tmp_path / "routing_trace.jsonl").steps[-1] == {"bank": [0, 4]}
