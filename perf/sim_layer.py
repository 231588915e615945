"""One layer's cost (`LayerCost`) and the helpers every simulated system shares.

Legend: W ranks, E experts, src_WE the rows each source rank routes to each expert, dest_WE
the rank that computes all of source s's rows of expert e (EP's owners, FasterMoE's shadows);
tensors throughout, so a 1024-rank layer costs milliseconds to price, not seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def dense_sync_exposed(w: Workload, c: Cluster, hide_s: float) -> float:
    """FSDP2 on one layer's dense parameters: 2 all-gathers + 1 reduce-scatter, hidden."""
    shard = w.dense_params_per_layer * w.param_bytes / c.world
    return max(0.0, 3 * all_gather_s(shard, c.world, c) - hide_s)


def a2a_cost(
    src_WE: torch.Tensor, dest_of: Assignment | torch.Tensor, w: Workload, c: Cluster
) -> tuple[float, float]:
    """(time of the four all-to-alls, bytes sent by all ranks) for an Assignment or dest_WE."""
    W = c.world
    if isinstance(dest_of, Assignment):
        s, _, h, n = dest_of.moves.cpu().unbind(1)
        rows = torch.zeros(W * W, dtype=torch.int64).index_add_(0, s * W + h, n).view(W, W)
    else:
        rows = torch.zeros(W, W, dtype=torch.int64).scatter_add_(1, dest_of, src_WE)
    m = rows.fill_diagonal_(0).to(torch.float64) * (w.d_model * w.act_bytes)  # stays: free
    return 4 * transfer_s(m, c), 4 * float(m.sum())


def dest_rows(src_WE: torch.Tensor, dest_WE: torch.Tensor) -> list[int]:
    """Rows each rank computes when dest_WE[s, e] computes all of src_WE[s, e]."""
    rows_W = torch.zeros(src_WE.shape[0], dtype=torch.int64)
    return rows_W.index_add_(0, dest_WE.reshape(-1), src_WE.reshape(-1)).tolist()


def owner_dest(owner: list[int], world: int) -> torch.Tensor:
    """dest_WE of EP: every source sends expert e's rows to its owner."""
    return torch.as_tensor(owner, dtype=torch.int64)[None, :].expand(world, -1)


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
