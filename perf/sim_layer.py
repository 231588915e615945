"""One layer's cost (`LayerCost`) and the helpers every simulated system shares.

Legend: W ranks, E experts, src_WE the rows each source rank routes to each expert, a plan
`[s][e] -> [(dest, rows), ...]` where each source's rows of each expert go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fssdp.assign import Assignment
from perf.cost_model import Cluster, Workload, all_gather_s, attn_fwd_s, expert_s, transfer_s


@dataclass
class LayerCost:
    dense_s: float  # attention forward + backward
    expert_s: float  # the slowest rank's expert compute (forward + backward)
    a2a_s: float = 0.0  # token all-to-alls, out and back, forward and backward
    exposed_s: float = 0.0  # transfers not hidden behind compute
    plan_s: float = 0.0  # planner + dispatcher wall time, on the critical path (fssdp)
    rows_max: int = 0
    rows_mean: float = 0.0
    bytes: dict[str, float] = field(default_factory=dict)  # sent, all ranks

    @property
    def total_s(self) -> float:
        return self.dense_s + self.expert_s + self.a2a_s + self.exposed_s + self.plan_s


def zeros(W: int) -> list[list[float]]:
    return [[0.0] * W for _ in range(W)]


def dense_sync_exposed(w: Workload, c: Cluster, hide_s: float) -> float:
    """FSDP2 on one layer's dense parameters: 2 all-gathers + 1 reduce-scatter, hidden."""
    shard = w.dense_params_per_layer * w.param_bytes / c.world
    return max(0.0, 3 * all_gather_s(shard, c.world, c) - hide_s)


def a2a_cost(
    src_WE: Any, dest_of: Assignment | list[list[list[tuple[int, int]]]], w: Workload, c: Cluster
) -> tuple[float, float]:
    """(time of the four all-to-alls, bytes sent by all ranks) for an Assignment or a (source,
    expert) → chunks plan: dest_of[s][e] = [(dest, rows), ...]."""
    if isinstance(dest_of, Assignment):
        s, _, h, n = dest_of.moves.cpu().unbind(1)
        rows = torch.zeros(c.world * c.world, dtype=torch.int64)
        rows.index_add_(0, s * c.world + h, n * (s != h))
        m = (rows.view(c.world, c.world).to(torch.float64) * (w.d_model * w.act_bytes)).tolist()
    else:
        m = zeros(c.world)
        for s_, per_e in enumerate(dest_of):
            for chunks in per_e:
                for h_, n_ in chunks:
                    if h_ != s_:
                        m[s_][h_] += n_ * w.d_model * w.act_bytes
    sent = sum(map(sum, m))
    return 4 * transfer_s(m, c), 4 * sent


def owner_plan(src_WE: list[list[int]], owner: list[int]) -> list[list[list[tuple[int, int]]]]:
    return [[[(owner[e], n)] if n else [] for e, n in enumerate(row)] for row in src_WE]


def layer_cost(w: Workload, c: Cluster, rows: list[int], a2a: tuple[float, float]) -> LayerCost:
    fwd = attn_fwd_s(w, c)
    return LayerCost(
        dense_s=3 * fwd,
        expert_s=expert_s(max(rows), w, c),
        a2a_s=a2a[0],
        exposed_s=dense_sync_exposed(w, c, 3 * fwd),
        rows_max=max(rows),
        rows_mean=sum(rows) / len(rows),
        bytes={"a2a": a2a[1]},
    )
