"""Replay a routing trace through one simulated system: predicted time of every step.

Legend: W ranks, E experts, L layers of the simulated workload; trace banks are mapped onto the
L layers in order (cycled when the workload has more layers than the trace has banks), and each
step's rows per expert are rescaled to the workload's W·tokens_per_rank·K rows.

[Note: more ranks than experts]
With W > E every system runs as W/E groups of E ranks (expert-data parallelism, as DeepSpeed's
ep_size ≤ E): ep / fssdp / fastermoe are simulated on one group of E ranks (whole nodes), and each
layer adds the all-reduce of its experts' gradients across the W/E groups (over the NICs,
hidden behind the layer's backward). fsdp and ddp run over all W ranks in closed form.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from launch.routing_trace import RoutingTrace
from perf.cost_model import Cluster, Workload, attn_fwd_s, head_fwd_s, scale_rows
from perf.sim_systems import SYSTEMS, LayerCost, make

GROUPED = ("ep", "fssdp", "fastermoe")


@dataclass
class StepResult:
    step_s: float
    layers: list[LayerCost]


def _layer_loads(trace: RoutingTrace, n_layers: int) -> list[list[list[int]]]:
    """Per step, per workload layer: the trace's rows per expert."""
    banks = sorted(trace.steps[0])
    return [[step[banks[i % len(banks)]] for i in range(n_layers)] for step in trace.steps]


def _params_per_rank(name: str, w: Workload, world: int) -> float:
    dense = w.n_layers * w.dense_params_per_layer + w.embed_params
    experts = w.n_layers * w.num_experts * w.expert_params
    if name == "ddp":
        return dense + experts
    return (dense + experts) / world


def _group_sync_s(w: Workload, c: Cluster, groups: int) -> float:
    """Across-group all-reduce of one layer's owned expert gradients ([Note: more ranks …])."""
    if groups <= 1:
        return 0.0
    owned = w.num_experts / min(c.world, w.num_experts) * w.expert_params * w.grad_bytes
    # every device of a node syncs at once through the node's NIC
    return 2 * (groups - 1) / groups * owned * c.per_node / c.inter_bw


# key -> (the trace it was computed from, the costs); the trace is kept and compared by
# identity, so a later trace that reuses a freed one's id() cannot hit a stale entry.
_GROUP_CACHE: dict[tuple, tuple[RoutingTrace, list[list[LayerCost]]]] = {}


def _layer_costs(name: str, trace: RoutingTrace, w: Workload, c: Cluster, **kw: Any) -> list:
    """Per step, per layer: the system's cost on cluster `c` (cached: with W > E every world
    simulates the same group of E ranks)."""
    key = (name, id(trace), w, c, tuple(sorted(kw.items())))
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0] is trace:
        return hit[1]
    system: Any = make(name, w, c, **kw)
    total_rows = c.world * w.rows_per_rank
    out = []
    for step in _layer_loads(trace, w.n_layers):
        if hasattr(system, "start_step"):
            system.start_step()
        out.append(
            [system.layer(f"layer{i}", scale_rows(x, total_rows)) for i, x in enumerate(step)]
        )
    _GROUP_CACHE[key] = (trace, out)
    return out


def simulate(
    name: str, trace: RoutingTrace, w: Workload, c: Cluster, **kw: Any
) -> list[StepResult]:
    """Predicted time of every step of `trace` under system `name` (see module docstring)."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; known: {SYSTEMS}")
    groups = c.world // w.num_experts if name in GROUPED and c.world > w.num_experts else 1
    sim_c = c.with_world(w.num_experts) if groups > 1 else c
    hidden = 2 * attn_fwd_s(w, c)
    sync = max(0.0, _group_sync_s(w, c, groups) - hidden)
    fixed = 3 * head_fwd_s(w, c) + c.opt_s_per_param * _params_per_rank(name, w, c.world)
    out = []
    for costs in _layer_costs(name, trace, w, sim_c, **kw):
        layers = [replace(x, exposed_s=x.exposed_s + sync) for x in costs]
        out.append(StepResult(sum(x.total_s for x in layers) + fixed + c.step_overhead_s, layers))
    return out


def summary(results: list[StepResult], warmup: int) -> dict[str, Any]:
    """Median step time after the warm-up, and where it goes (median over steps, summed over
    layers)."""
    kept = results[warmup:] or results
    parts = ("dense_s", "expert_s", "a2a_s", "exposed_s", "plan_s")

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in kept)

    return {
        "step_s": med(lambda r: r.step_s),
        **{p: med(lambda r, p=p: sum(getattr(x, p) for x in r.layers)) for p in parts},
        "rows_max_over_mean": med(
            lambda r: statistics.mean(x.rows_max / x.rows_mean for x in r.layers if x.rows_mean)
        ),
    }
