"""Step time of one MoE layer under each system, for one step's rows per expert.

Legend: W ranks, E experts, rows_E global (token, expert) rows per expert this step, src_WE the
rows each source rank routes to each expert, M_SR a bytes matrix (perf/cost_model.py).

FSSDP is simulated with the project's own planner and dispatcher (perf/sim_fssdp.py).

[Note: overlap rules] (the runtime as built: fssdp/executor.py, fssdp/replicas.py)
- ep / fssdp: the token all-to-alls (out and back, forward and backward) are on the critical
  path. fssdp's spAG of a layer hides behind that layer's attention forward (with `lookahead`
  also behind the previous layer's whole forward: the prefetch issued one layer early, not
  what the runtime does today), its spRS behind that layer's attention backward; only the excess
  is exposed. The overlap degree t fed to the planner is computed from the same window.
- dense parameters (ep, fssdp, fsdp): FSDP2 all-gathers / reduce-scatters per layer, hidden
  behind the layer's compute (prefetch), excess exposed.
- fsdp: the experts are all-gathered like dense parameters (forward, again in backward, then
  reduce-scattered), hidden behind the layer's compute (attention + experts).
- ddp: one all-reduce of every gradient, hidden behind the whole backward, excess exposed.
- fastermoe (shadowing, FasterMoE-style): after gating, the k hottest experts are broadcast
  from their owners to every rank (exposed; pipelined NCCL broadcasts, perf/sim_spag.py) and
  their rows computed where they are routed;
  the rest go to the owners by all-to-all; shadow gradients are reduced to the owners behind
  the attention backward. k is the best for this step's true counts (an oracle for FasterMoE),
  at most the memory cap fssdp gets (m = 2 extra expert slots per rank; `fastermoe_unbounded`
  in perf/simulate.py lifts the cap).
"""

from __future__ import annotations

import torch

from fssdp.sharding import contiguous_sharding
from perf.cost_model import (
    Cluster,
    Workload,
    all_gather_s,
    all_reduce_s,
    attn_fwd_s,
    even_sources,
    expert_s,
)
from perf.sim_fssdp import FSSDPSim
from perf.sim_layer import LayerCost, a2a_cost, dest_rows, layer_cost, owner_dest
from perf.sim_spag import broadcast_s

SYSTEMS = ("ep", "fssdp", "fsdp", "ddp", "fastermoe")


class EPSim:
    """Static contiguous owners; tokens to owners by all-to-all."""

    name = "ep"

    def __init__(self, w: Workload, c: Cluster) -> None:
        self.w, self.c = w, c
        self.owner = contiguous_sharding(w.num_experts, c.world)
        self.dest = owner_dest(self.owner, c.world)  # dest_WE: every row to its owner

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        src = even_sources(rows_E, self.c.world)
        return layer_cost(
            self.w, self.c, dest_rows(src, self.dest), a2a_cost(src, self.dest, self.w, self.c)
        )


class FSDPSim:
    """Every expert all-gathered every layer; tokens stay where they are."""

    name = "fsdp"

    def __init__(self, w: Workload, c: Cluster) -> None:
        self.w, self.c = w, c

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        w, c = self.w, self.c
        rows = [w.rows_per_rank] * c.world
        cost = layer_cost(w, c, rows, (0.0, 0.0))
        shard = w.num_experts * w.expert_params * w.param_bytes / c.world
        ag = all_gather_s(shard, c.world, c)
        rs = all_gather_s(shard * w.grad_bytes / w.param_bytes, c.world, c)
        fwd_compute = cost.dense_s / 3 + cost.expert_s / 3
        cost.exposed_s += max(0.0, ag - fwd_compute) + max(0.0, ag + rs - 2 * fwd_compute)
        cost.bytes["fsdp_expert"] = 3 * (c.world - 1) * shard * c.world
        return cost


class DDPSim:
    """Everything replicated; one gradient all-reduce hidden behind the backward."""

    name = "ddp"

    def __init__(self, w: Workload, c: Cluster) -> None:
        self.w, self.c = w, c

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        w, c = self.w, self.c
        rows = [w.rows_per_rank] * c.world
        fwd = attn_fwd_s(w, c)
        cost = LayerCost(3 * fwd, expert_s(rows[0], w, c), rows_max=rows[0], rows_mean=rows[0])
        grads = (w.dense_params_per_layer + w.num_experts * w.expert_params) * w.grad_bytes
        cost.exposed_s = max(
            0.0, all_reduce_s(grads, c.world, c) - (2 * fwd + cost.expert_s * 2 / 3)
        )
        cost.bytes["dense"] = 2 * (c.world - 1) * grads
        return cost


class FasterMoESim:
    """EP plus shadow experts (broadcast to all ranks) chosen per step; [Note: overlap rules].

    A shadow takes one expert slot on every rank: `max_shadows` (the memory cap m that fssdp
    gets, by default) compares the two at equal memory; None lets the oracle take any number."""

    name = "fastermoe"

    def __init__(self, w: Workload, c: Cluster, max_shadows: int | None = 2) -> None:
        self.w, self.c = w, c
        self.owner = contiguous_sharding(w.num_experts, c.world)
        self.max_shadows = w.num_experts if max_shadows is None else max_shadows
        self.dest = owner_dest(self.owner, c.world)  # dest_WE without shadows

    def _with_shadows(self, src: torch.Tensor, shadow: list[int]) -> LayerCost:
        w, c = self.w, self.c
        dest = self.dest
        if shadow:  # a shadowed expert's rows stay on their source rank
            dest = dest.clone()
            dest[:, torch.tensor(shadow)] = torch.arange(c.world)[:, None]
        cost = layer_cost(w, c, dest_rows(src, dest), a2a_cost(src, dest, w, c))
        if shadow:  # pipelined NCCL broadcasts out, reduces back ([Note: pricing the ...])
            k, copies = len(shadow), len(shadow) * (c.world - 1)
            cost.exposed_s += broadcast_s(k, c, w.expert_params * w.param_bytes)
            red = broadcast_s(k, c, w.expert_params * w.grad_bytes)
            cost.exposed_s += max(0.0, red - 2 * attn_fwd_s(w, c))
            cost.bytes.update(
                spag=copies * w.expert_params * w.param_bytes,
                sprs=copies * w.expert_params * w.grad_bytes,
            )
        return cost

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        src = even_sources(rows_E, self.c.world)
        order = sorted(range(len(rows_E)), key=lambda e: (-rows_E[e], e))
        best = self._with_shadows(src, [])
        for k in range(1, min(len(order), self.max_shadows) + 1):
            trial = self._with_shadows(src, order[:k])
            if trial.total_s >= best.total_s:
                break  # hotter experts first: once a shadow stops paying, colder ones won't
            best = trial
        return best


def make(name: str, w: Workload, c: Cluster, **kw: object) -> object:
    cls = {
        "ep": EPSim,
        "fssdp": FSSDPSim,
        "fsdp": FSDPSim,
        "ddp": DDPSim,
        "fastermoe": FasterMoESim,
    }
    return cls[name](w, c, **kw)  # type: ignore[arg-type]
