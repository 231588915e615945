"""Placement policies: how one bank's placement P1 ⊇ P0 is chosen each step.

One policy object per bank; it owns what its mode needs (the load estimator, the agreed timings)
and is asked at three points of a step:
- `before_forward()`: the placement to prefetch while the layer's dense work runs (None: plan
  after routing instead);
- `after_routing(counts_WE, prefetched)`: the placement the bank runs with, from the true
  counts (exact, calibrate) or the prefetched one (predict, static);
- `end_step(counts_E, timing)`: the step's global load and the timings agreed over ranks
  (identical on every rank, so every rank plans the same placement without messages).

Legend: W ranks, E experts of the bank, t overlap degree, m memory cap (extra expert slots
per rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from collectives.placement import Placement, Topology
from fssdp.planner import (
    LoadEstimator,
    Locality,
    calibrate,
    overlap_degree,
    plan_exact,
    plan_exact_if_it_pays,
    plan_placement,
)


@dataclass
class AgreedTiming:
    """Per-step timings, maxima over ranks (plan for the slowest rank)."""

    overlap_s: float = 0.0  # dense work a prefetched spAG hid behind (0: nothing measured)
    time_per_row_s: float = 0.0  # expert compute seconds per row (0: nothing measured)


class PlacementPolicy:
    """Base: the static placement (EP's): owners only, never a transfer."""

    mode = "static"
    prefetches = False
    timed = False  # whether end_step wants the timings agreed over ranks (an all-reduce)

    def __init__(self, ownership: Placement, topology: Topology) -> None:
        # P0; replaced when re-sharding moves owners.
        self.ownership = ownership
        self.topology = topology

    def before_forward(self) -> Placement | None:
        return None

    def after_routing(self, counts_WE: Tensor, prefetched: Placement | None) -> Placement:
        return self.ownership

    def end_step(self, counts_E: Tensor | None, timing: AgreedTiming) -> None:
        return None

    def set_ownership(self, ownership: Placement) -> None:
        self.ownership = ownership


# [Note: when replication pays]
# Exact mode plans after routing, so whatever it decides is on the critical path: a replica's
# spAG in forward (and its spRS in backward). Replication can only shorten the step by what it
# takes off the busiest rank, at most (busiest rank's rows - lam) * time per row, lam the mean
# rounded up; one copy costs at least expert_bytes / bandwidth. When that best case does not
# beat one copy (balanced routing, small imbalance, slow links, cheap experts), the bank runs
# with the ownership placement, as EP: no planning, no transfer. Otherwise the candidates of
# [Note: exact mode] are priced as in [Note: calibration] (fssdp/plan_exact.py): the gain on
# the busiest rank against the busiest link's copies, the largest k copies of a candidate for
# k = all, 1/2, 1/4, 1/8, and the best positive net gain wins (none: ownership). Both sides
# are forward-only (expert compute per row is timed in forward; backward adds about twice the
# gain and one spRS per copy), which leans towards not replicating. The two constants are the
# same on every rank: the bandwidth measured once at start (the slowest rank's), the time per
# row agreed each step with the other timings (max over ranks), so every rank decides alike.
# Before the first step is timed, the balancing plan runs as it is.


class ExactPolicy(PlacementPolicy):
    """Plan from the true counts after routing; the transfer is on the critical path. With
    `cost_aware`, only where it pays ([Note: when replication pays])."""

    mode = "exact"

    def __init__(
        self,
        ownership: Placement,
        topology: Topology,
        memory_cap: int,
        cost_aware: bool = False,
        row_bytes: int = 0,
        bandwidth: float = 0.0,
        locality: Locality | None = None,
    ) -> None:
        super().__init__(ownership, topology)
        self.memory_cap = memory_cap
        # node-local replicas before balancing (None: balance only); used with > 1 node
        self.locality = locality
        self.cost_aware = cost_aware
        self.timed = cost_aware  # asks for the agreed timings at each step's end
        self.row_bytes = row_bytes  # bytes of one expert copy on the wire
        self.bandwidth = bandwidth  # sparse-transfer bytes/s, measured once and agreed
        self.timing = AgreedTiming()

    def after_routing(self, counts_WE: Tensor, prefetched: Placement | None) -> Placement:
        if self.memory_cap <= 0:
            return self.ownership
        tpr = self.timing.time_per_row_s
        if not self.cost_aware or tpr <= 0 or self.bandwidth <= 0 or self.row_bytes <= 0:
            return plan_exact(
                counts_WE, self.ownership, self.topology, self.memory_cap, self.locality
            )
        return plan_exact_if_it_pays(
            counts_WE, self.ownership, self.topology, self.memory_cap, self.row_bytes,
            self.bandwidth, tpr,
        )

    def end_step(self, counts_E: Tensor | None, timing: AgreedTiming) -> None:
        if timing.time_per_row_s > 0:
            self.timing.time_per_row_s = timing.time_per_row_s


class PredictPolicy(PlacementPolicy):
    """The paper's mode: plan before routing from the sliding-window load estimate; the spAG
    is prefetched behind the layer's dense work."""

    mode = "predict"
    prefetches = True
    timed = True

    def __init__(
        self,
        ownership: Placement,
        topology: Topology,
        memory_cap: int,
        window: int,
        overlap_degree_override: int,
        row_bytes: int,
        bandwidth: float,
    ) -> None:
        super().__init__(ownership, topology)
        self.memory_cap = memory_cap
        self.estimator = LoadEstimator(ownership.num_experts, window)
        # >= 0: a fixed t; -1: from the agreed overlap time and the measured bandwidth.
        self.fixed_degree = overlap_degree_override
        self.row_bytes = row_bytes
        self.bandwidth = bandwidth  # sparse-transfer bytes/s, measured once and agreed
        self.timing = AgreedTiming()
        self._next: Placement = ownership

    def degree(self) -> int:
        """t: expert copies that fit behind the overlap window (memory_cap before any timing)."""
        if self.fixed_degree >= 0:
            return self.fixed_degree
        if self.timing.overlap_s <= 0:
            return self.memory_cap
        return overlap_degree(
            self.timing.overlap_s, self.bandwidth, self.row_bytes, self.ownership.num_experts
        )

    def before_forward(self) -> Placement | None:
        return self._next

    def after_routing(self, counts_WE: Tensor, prefetched: Placement | None) -> Placement:
        return prefetched if prefetched is not None else self._next

    def end_step(self, counts_E: Tensor | None, timing: AgreedTiming) -> None:
        if counts_E is not None:
            self.estimator.update(counts_E.tolist())
        if timing.overlap_s > 0:
            self.timing.overlap_s = timing.overlap_s
        if timing.time_per_row_s > 0:
            self.timing.time_per_row_s = timing.time_per_row_s
        self.replan()

    def replan(self) -> None:
        self._next = plan_placement(
            self.estimator.estimate(), self.ownership, self.topology, self.degree(),
            self.memory_cap,
        )

    def set_ownership(self, ownership: Placement) -> None:
        super().set_ownership(ownership)
        self.replan()


class CalibratePolicy(PredictPolicy):
    """Predict, then, with the true counts, gather more where the gain on the critical path
    beats the transfer ([Note: calibration] in fssdp/planner.py)."""

    mode = "calibrate"

    def after_routing(self, counts_WE: Tensor, prefetched: Placement | None) -> Placement:
        base = super().after_routing(counts_WE, prefetched)
        return calibrate(
            base,
            counts_WE,
            self.topology,
            self.memory_cap,
            self.row_bytes,
            self.bandwidth,
            self.timing.time_per_row_s or 1e-6,
        )
