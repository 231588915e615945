"""Per bank, per iteration: which experts to materialize where (fssdp/policy.py asks).

Legend: W ranks, E experts, B banks, t the overlap degree (expert copies one rank can receive
while the transfer hides behind other work), m the memory cap (extra expert slots per rank,
i.e. replicas a rank may hold beyond the experts it owns). A placement returned here always
contains the one it started from (owners unchanged, replicas only added).

All functions are pure and deterministic integer tensor code on the inputs' device (loads are
scaled to integers first): every rank calls them with the same inputs and gets the same
placement, so no rank has to broadcast its plan. Ties break by expert id, then rank id.
Predict: fssdp/plan_predict.py ([Note: proportional slots, nodes first]); exact and calibrate:
fssdp/plan_exact.py ([Note: exact mode], [Note: calibration]).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from collectives.placement import Placement, Topology
from fssdp.assign import as_counts
from fssdp.plan_exact import calibrate_t, plan_exact_t
from fssdp.plan_local import Locality, node_local_replicas
from fssdp.plan_predict import plan_placement_banks as _predict_banks

__all__ = [
    "LoadEstimator",
    "Locality",
    "calibrate",
    "free_slots",
    "overlap_degree",
    "plan_exact",
    "plan_exact_if_it_pays",
    "plan_placement",
    "plan_placement_banks",
]


def _as_floats(x: Any) -> list[float]:
    return [float(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]


# -- load estimate ---------------------------------------------------------------------------


class LoadEstimator:
    """Sliding-window mean of the last `window` iterations' global token counts per expert."""

    def __init__(self, num_experts: int, window: int = 5) -> None:
        if num_experts < 0 or window < 1:
            raise ValueError(
                f"LoadEstimator: need num_experts >= 0 and window >= 1, got {num_experts}, {window}"
            )
        self.num_experts = num_experts
        self.window = window
        self._history: deque[list[float]] = deque(maxlen=window)

    def update(self, counts_E: Any) -> None:
        counts = _as_floats(counts_E)
        if len(counts) != self.num_experts:
            raise ValueError(
                f"LoadEstimator.update: got {len(counts)} counts, expected E={self.num_experts}"
            )
        self._history.append(counts)

    def estimate(self) -> list[float]:
        """Mean per expert over the window; all 1.0 (uniform) before the first update."""
        if not self._history:
            return [1.0] * self.num_experts
        n = len(self._history)
        return [sum(col) / n for col in zip(*self._history)]

    def state_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "window": self.window,
            "history": [list(h) for h in self._history],
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_experts"] != self.num_experts:
            raise ValueError(
                f"LoadEstimator.load_state_dict: checkpoint has E={sd['num_experts']}, "
                f"this bank has E={self.num_experts}"
            )
        self._history.clear()
        for counts in sd["history"][-self.window :]:
            self.update(counts)


def overlap_degree(
    overlap_time_s: float, bandwidth_bytes_per_s: float, expert_bytes: int, num_experts: int
) -> int:
    """t = floor(T_overlap * bandwidth / S_e), clamped to [0, num_experts]."""
    if expert_bytes <= 0:
        raise ValueError(f"overlap_degree: expert_bytes must be > 0, got {expert_bytes}")
    copies = overlap_time_s * bandwidth_bytes_per_s / expert_bytes
    if math.isnan(copies) or copies <= 0:
        return 0
    return num_experts if math.isinf(copies) else max(0, min(num_experts, math.floor(copies)))


def free_slots(placement: Placement, m: int) -> list[int]:
    """Per rank: m minus the replicas (held, not owned) it already has; never below 0."""
    return (m - placement.replicas_W()).clamp(min=0).tolist()


def _check_topology(name: str, placement: Placement, topology: Topology) -> None:
    if topology.world_size != placement.world_size:
        raise ValueError(
            f"{name}: topology has {topology.world_size} ranks, expected {placement.world_size}"
        )


def _as_loads(name: str, load: Any, E: int) -> Tensor:
    t = load if isinstance(load, Tensor) else torch.tensor(_as_floats(load), dtype=torch.float64)
    if t.dim() != 1 or t.numel() != E:
        raise ValueError(f"{name}: got {t.numel()} loads, expected E={E}")
    return t


# -- predicted placement ---------------------------------------------------------------------


def plan_placement(
    load_E: Any, ownership: Placement, topology: Topology, t: int, m: int
) -> Placement:
    """Predicted placement P1 ⊇ ownership from estimated loads.

    t <- min(t, E), m <- min(m, t). t <= m: the top-t experts go to every rank. Otherwise the
    free slots are dealt per [Note: proportional slots, nodes first]. Experts with zero
    estimated load are never replicated. Replicas already in `ownership` count against m.
    """
    loads = _as_loads("plan_placement", load_E, ownership.num_experts)
    _check_topology("plan_placement", ownership, topology)
    return _predict_banks(loads[None], [ownership], topology, t, m)[0]


def plan_placement_banks(
    loads_BE: Any, ownerships: Sequence[Placement], topology: Topology, t: int, m: int
) -> list[Placement]:
    """`plan_placement` for B banks at once (same E, W, t and m): one batched plan."""
    owns = list(ownerships)
    if not owns:
        return []
    E = owns[0].num_experts
    loads = loads_BE if isinstance(loads_BE, Tensor) else torch.tensor(
        [_as_floats(x) for x in loads_BE], dtype=torch.float64
    )
    if loads.dim() != 2 or loads.shape != (len(owns), E):
        raise ValueError(
            f"plan_placement_banks: loads have shape {list(loads.shape)}, expected "
            f"[{len(owns)}, {E}] (one row per bank)"
        )
    for o in owns:
        if (o.num_experts, o.world_size) != (E, owns[0].world_size):
            raise ValueError("plan_placement_banks: every bank needs the same E and W")
        _check_topology("plan_placement_banks", o, topology)
    return _predict_banks(loads, owns, topology, t, m)


# -- exact placement (after routing) and calibration ------------------------------------------


def plan_exact(
    counts_WE: Any,
    ownership: Placement,
    topology: Topology,
    m: int,
    locality: Locality | None = None,
) -> Placement:
    """Placement ⊇ ownership that balances rows per rank for the true counts (after routing).

    At most m replicas per rank (replicas already in `ownership` count). With `locality` and
    more than one node, the node-local replicas come first ([Note: node-local replicas] in
    fssdp/plan_local.py; at most min(m - 1, locality.slots) per rank). The busiest rank ends at
    most at the mean (rounded up) or the busiest rank of the placement balancing starts from
    (across nodes, with [Note: node-first rows] in fssdp/plan_nodes.py, where rows leaving
    their node are weighed with it, [Note: grouped rooms]); carries the rows it planned per holder
    ([Note: planned rows] in fssdp/quotas.py). See [Note: exact mode] in fssdp/plan_exact.py.
    """
    _check_topology("plan_exact", ownership, topology)
    counts = as_counts(counts_WE, ownership.world_size, ownership.num_experts, signs=False)
    if m <= 0 or ownership.world_size == 1 or ownership.num_experts == 0:
        as_counts(counts, ownership.world_size, ownership.num_experts)
        return ownership
    base = ownership.to(counts.device)
    if locality is not None and topology.num_nodes > 1:
        slots = min(m - 1, locality.slots)  # one slot per rank stays for balancing
        base = node_local_replicas(counts, base, topology, replace(locality, slots=slots))
    return plan_exact_t(counts, base, topology, m)


def plan_exact_if_it_pays(
    counts_WE: Any,
    ownership: Placement,
    topology: Topology,
    m: int,
    expert_bytes: int,
    bandwidth_bytes_per_s: float,
    time_per_row_s: float,
) -> Placement:
    """`plan_exact` where replication pays, else `ownership` ([Note: when replication pays] in
    fssdp/policy.py): first the best case (the busiest rank down to the mean) against one copy,
    in O(W E) with no planning; then the exact candidates priced as by `calibrate`."""
    _check_topology("plan_exact_if_it_pays", ownership, topology)
    counts = as_counts(counts_WE, ownership.world_size, ownership.num_experts, signs=False)
    W = ownership.world_size
    if m <= 0 or W == 1 or not counts.numel() or bandwidth_bytes_per_s <= 0:
        as_counts(counts, W, ownership.num_experts)
        return ownership
    own = ownership.to(counts.device)
    per_expert_E = counts.sum(0)
    load_W = torch.zeros(W, dtype=per_expert_E.dtype, device=counts.device).index_add_(
        0, own.owner_E, per_expert_E
    )
    total, busiest = (int(v) for v in torch.stack([load_W.sum(), load_W.max()]).tolist())
    best_gain_s = (busiest - -(-total // W)) * time_per_row_s
    if not best_gain_s > expert_bytes / bandwidth_bytes_per_s:
        as_counts(counts, W, ownership.num_experts)  # the checks plan_exact would have made
        return ownership
    return calibrate_t(
        own, counts, topology, m, expert_bytes, bandwidth_bytes_per_s, time_per_row_s
    )


def calibrate(
    predicted: Placement,
    counts_WE: Any,
    topology: Topology,
    m: int,
    expert_bytes: int,
    bandwidth_bytes_per_s: float,
    time_per_row_s: float,
) -> Placement:
    """predicted ∪ the extra pairs worth their transfer, per [Note: calibration]."""
    _check_topology("calibrate", predicted, topology)
    counts = as_counts(counts_WE, predicted.world_size, predicted.num_experts, signs=False)
    if bandwidth_bytes_per_s <= 0 or m <= 0 or predicted.world_size == 1 or not counts.numel():
        as_counts(counts, predicted.world_size, predicted.num_experts)
        return predicted
    return calibrate_t(
        predicted.to(counts.device), counts, topology, m, expert_bytes,
        bandwidth_bytes_per_s, time_per_row_s,
    )
