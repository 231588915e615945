"""Routing traces: per-step tokens per expert of every bank, for the cluster-scale simulator.

File: `<run dir>/routing_trace.jsonl`. The first line is a header
`{"kind": "fssdp-routing-trace", "version": 1, "model": <family>, "world_size": W,
"tokens_per_step": B·S, "top_k": K, "banks": {bank: {"num_experts": E, "expert_bytes": S_bytes,
"rows_per_token": ...}}}`; each further line is one step
`{"step": s, "banks": {bank: [global rows per expert, E ints]}}` (rows = token-expert pairs
summed over the calls of the bank in that step). Written by rank 0 when `train.routing_trace`
is true; read by `perf.simulate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIND = "fssdp-routing-trace"
VERSION = 1


@dataclass
class RoutingTrace:
    header: dict[str, Any]
    steps: list[dict[str, list[int]]]  # per step: bank -> rows per expert


class TraceWriter:
    def __init__(self, path: Path, header: dict[str, Any], append: bool = False) -> None:
        self.path = path
        if not (append and path.exists()):
            path.write_text(json.dumps({"kind": KIND, "version": VERSION, **header}) + "\n")

    def write(self, step: int, banks: dict[str, list[int]]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "banks": banks}) + "\n")


def read_trace(path: Path) -> RoutingTrace:
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path} is empty: not a routing trace")
    header = json.loads(lines[0])
    if header.get("kind") != KIND or header.get("version") != VERSION:
        raise ValueError(f"{path} is not a version-{VERSION} {KIND} file")
    steps = [json.loads(line)["banks"] for line in lines[1:] if line.strip()]
    return RoutingTrace(header, steps)
