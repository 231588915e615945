"""Step time of one MoE layer under each system, for one step's rows per expert.

Legend: W ranks, E experts, rows_E global (token, expert) rows per expert this step, src_WE the
rows each source rank routes to each expert, M_SR a bytes matrix (perf/cost_model.py).

FSSDP is simulated with the project's own algorithm: `fssdp.sharding` for ownership,
`fssdp.planner.LoadEstimator` + `plan_placement` (or `plan_exact`; or the proposed
[Note: costed degree]) for the placement,
`fssdp.assign.assign_tokens` / `rows_per_rank` for the dispatch, so the rows each rank computes
and the bytes each link carries are the real runtime's. The planner's and dispatcher's own CPU
time (process time of this Python, as the runtime would spend it on the critical path) is
measured here and reported as `plan_s`.

[Note: overlap rules] (DESIGN.md §2 and the runtime as built)
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
  from their owners to every rank (exposed) and their rows computed where they are routed;
  the rest go to the owners by all-to-all; shadow gradients are reduced to the owners behind
  the attention backward. k is the best for this step's true counts (an oracle for FasterMoE).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from collectives.placement import Placement, Topology
from fssdp.assign import assign_tokens, rows_per_rank
from fssdp.planner import LoadEstimator, calibrate, overlap_degree, plan_exact, plan_placement
from fssdp.sharding import balanced_uniform_sharding, contiguous_sharding
from perf.cost_model import (
    Cluster,
    Workload,
    all_gather_s,
    all_reduce_s,
    attn_fwd_s,
    even_sources,
    expert_s,
    transfer_s,
)

SYSTEMS = ("ep", "fssdp", "fsdp", "ddp", "fastermoe")

# [Note: costed degree]
# A proposed replacement of the runtime's overlap-degree rule (t = copies that fit behind the
# attention forward): for t in {0, 1, 2, 4, …}, plan with the estimated loads and m = max(cap, t),
# predict the slowest rank's expert time plus the exposed spAG/spRS time, keep the cheapest. It
# accepts an exposed transfer when the balance it buys is worth more, as FasterMoE's shadowing
# does, but judges on the estimate (before routing), so the transfer can still be prefetched.


@dataclass
class LayerCost:
    dense_s: float  # attention forward + backward
    expert_s: float  # the slowest rank's expert compute (forward + backward)
    a2a_s: float = 0.0  # token all-to-alls, out and back, forward and backward
    exposed_s: float = 0.0  # transfers not hidden behind compute
    plan_s: float = 0.0  # the planner's CPU time (fssdp)
    rows_max: int = 0
    rows_mean: float = 0.0
    bytes: dict[str, float] = field(default_factory=dict)  # sent, all ranks

    @property
    def total_s(self) -> float:
        return self.dense_s + self.expert_s + self.a2a_s + self.exposed_s + self.plan_s


def _zeros(W: int) -> list[list[float]]:
    return [[0.0] * W for _ in range(W)]


def _dense_sync_exposed(w: Workload, c: Cluster, hide_s: float) -> float:
    """FSDP2 on one layer's dense parameters: 2 all-gathers + 1 reduce-scatter, hidden."""
    shard = w.dense_params_per_layer * w.param_bytes / c.world
    return max(0.0, 3 * all_gather_s(shard, c.world, c) - hide_s)


def _a2a(
    src_WE: list[list[int]], dest_of: list[list[list[tuple[int, int]]]], w: Workload, c: Cluster
) -> tuple[float, float]:
    """(time of the four all-to-alls, bytes sent by all ranks) for a (source, expert) → chunks
    plan: dest_of[s][e] = [(dest, rows), ...]."""
    m = _zeros(c.world)
    for s, per_e in enumerate(dest_of):
        for chunks in per_e:
            for h, n in chunks:
                if h != s:
                    m[s][h] += n * w.d_model * w.act_bytes
    sent = sum(map(sum, m))
    return 4 * transfer_s(m, c), 4 * sent


def _owner_plan(src_WE: list[list[int]], owner: list[int]) -> list[list[list[tuple[int, int]]]]:
    return [[[(owner[e], n)] if n else [] for e, n in enumerate(row)] for row in src_WE]


def _rows(plan: list[list[list[tuple[int, int]]]], W: int) -> list[int]:
    rows = [0] * W
    for per_e in plan:
        for chunks in per_e:
            for h, n in chunks:
                rows[h] += n
    return rows


def _cost(w: Workload, c: Cluster, rows: list[int], a2a: tuple[float, float]) -> LayerCost:
    fwd = attn_fwd_s(w, c)
    return LayerCost(
        dense_s=3 * fwd,
        expert_s=expert_s(max(rows), w, c),
        a2a_s=a2a[0],
        exposed_s=_dense_sync_exposed(w, c, 3 * fwd),
        rows_max=max(rows),
        rows_mean=sum(rows) / len(rows),
        bytes={"a2a": a2a[1]},
    )


class EPSim:
    """Static contiguous owners; tokens to owners by all-to-all."""

    name = "ep"

    def __init__(self, w: Workload, c: Cluster) -> None:
        self.w, self.c = w, c
        self.owner = contiguous_sharding(w.num_experts, c.world)

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        src = even_sources(rows_E, self.c.world)
        plan = _owner_plan(src, self.owner)
        return _cost(self.w, self.c, _rows(plan, self.c.world), _a2a(src, plan, self.w, self.c))


class FSSDPSim:
    """The real planner and dispatcher; see [Note: overlap rules]."""

    name = "fssdp"

    def __init__(
        self,
        w: Workload,
        c: Cluster,
        memory_cap: int = 2,
        window: int = 5,
        mode: str = "predict",
        lookahead: bool = False,
    ) -> None:
        self.w, self.c, self.m, self.mode, self.lookahead = w, c, memory_cap, mode, lookahead
        self.window = window
        self.topo = Topology(c.world, c.per_node)
        self.owner: dict[str, Placement] = {}
        self.est: dict[str, LoadEstimator] = {}
        self.prev_fwd_s = 0.0  # the previous layer's forward this step (lookahead window)

    def start_step(self) -> None:
        self.prev_fwd_s = 0.0

    def _hide_fwd_s(self) -> float:
        """What the spAG hides behind: this layer's attention forward (+ the previous layer's
        forward with lookahead)."""
        if self.mode == "exact":
            return 0.0
        return attn_fwd_s(self.w, self.c) + (self.prev_fwd_s if self.lookahead else 0.0)

    def _bank(self, bank: str) -> tuple[Placement, LoadEstimator]:
        if bank not in self.owner:
            E = self.w.num_experts
            owners = balanced_uniform_sharding({bank: E}, self.topo)[bank]
            self.owner[bank] = Placement.from_owners(owners, self.c.world)
            self.est[bank] = LoadEstimator(E, self.window)
        return self.owner[bank], self.est[bank]

    def _spag_bw(self) -> float:
        """Per-device bandwidth of a spread-out spAG (intra and inter peers alike)."""
        c = self.c
        if c.nodes == 1:
            return c.intra_bw
        f_inter = (c.world - c.per_node) / (c.world - 1)
        share = c.inter_bw / c.per_node
        return 1.0 / (f_inter / share + (1 - f_inter) / c.intra_bw)

    def _placement(self, own: Placement, est: LoadEstimator, src: list[list[int]]) -> Placement:
        if self.mode == "exact":
            return plan_exact(src, own, self.topo, self.m)
        if not est._history:  # step 1: the runtime has planned nothing yet
            return own
        if self.mode == "costed":
            return self._costed(own, est.estimate())
        t = overlap_degree(self._hide_fwd_s(), self._spag_bw(), self._bytes_e(), self.w.num_experts)
        return plan_placement(est.estimate(), own, self.topo, t, self.m)

    def _costed(self, own: Placement, load_E: list[float]) -> Placement:
        """The proposed rule ([Note: costed degree]): the t (and m = max(cap, t)) whose predicted
        expert time + exposed transfers is least, judged on the *estimated* loads."""
        w, c = self.w, self.c
        scale = c.world * w.rows_per_rank / max(1.0, sum(load_E))
        est_src = even_sources([round(x * scale) for x in load_E], c.world)
        best: tuple[float, Placement] | None = None
        for t in (0, 1, 2, 4, 8, 16, 32):
            if t > w.num_experts:
                break
            p1 = plan_placement(load_E, own, self.topo, t, max(self.m, t))
            rows = rows_per_rank(est_src, assign_tokens(est_src, p1, self.topo))
            trial = LayerCost(0.0, expert_s(max(rows), w, c))
            self._materialize(trial, own, p1, self._hide_fwd_s())
            if best is None or trial.total_s < best[0]:
                best = (trial.total_s, p1)
        assert best is not None
        return best[1]

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        own, est = self._bank(bank)
        src = even_sources(rows_E, self.c.world)
        t0 = time.process_time()
        p1 = self._placement(own, est, src)
        p2 = self._calibrated(p1, src) if self.mode == "calibrate" else p1
        plan = assign_tokens(src, p2, self.topo)
        rows = rows_per_rank(src, plan)
        plan_s = time.process_time() - t0
        est.update(rows_E)
        cost = _cost(self.w, self.c, rows, _a2a(src, plan, self.w, self.c))
        cost.plan_s = plan_s
        self._materialize(cost, own, p1, self._hide_fwd_s())
        if p2 is not p1:  # calibration's extra copies: gathered after routing, not hidden
            self._materialize(cost, p1, p2, 0.0)
        self.prev_fwd_s = (cost.dense_s + cost.expert_s + cost.a2a_s) / 3
        return cost

    def _calibrated(self, p1: Placement, src: list[list[int]]) -> Placement:
        """The runtime's `calibrate` mode: extra copies for the true counts when they pay."""
        w, c = self.w, self.c
        per_row = expert_s(1, w, c)
        return calibrate(p1, src, self.topo, self.m, self._bytes_e(), self._spag_bw(), per_row)

    def _bytes_e(self) -> int:
        return self.w.expert_params * self.w.param_bytes

    def _materialize(self, cost: LayerCost, base: Placement, p: Placement, hide: float) -> None:
        """spAG base → p (hidden behind `hide` seconds) and the spRS back (behind the attention
        backward)."""
        w, c = self.w, self.c
        ag, rs = _zeros(c.world), _zeros(c.world)
        for e, holders in enumerate(p.holders):
            src = p.owner[e]
            for r in holders - base.holders[e]:
                ag[src][r] += w.expert_params * w.param_bytes
                rs[r][src] += w.expert_params * w.grad_bytes
        cost.exposed_s += max(0.0, transfer_s(ag, c) - hide)
        cost.exposed_s += max(0.0, transfer_s(rs, c) - 2 * attn_fwd_s(w, c))
        for k, m in (("spag", ag), ("sprs", rs)):
            cost.bytes[k] = cost.bytes.get(k, 0.0) + sum(map(sum, m))


class FSDPSim:
    """Every expert all-gathered every layer; tokens stay where they are."""

    name = "fsdp"

    def __init__(self, w: Workload, c: Cluster) -> None:
        self.w, self.c = w, c

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        w, c = self.w, self.c
        rows = [w.rows_per_rank] * c.world
        cost = _cost(w, c, rows, (0.0, 0.0))
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
    """EP plus shadow experts (broadcast to all ranks) chosen per step; [Note: overlap rules]."""

    name = "fastermoe"

    def __init__(self, w: Workload, c: Cluster) -> None:
        self.w, self.c = w, c
        self.owner = contiguous_sharding(w.num_experts, c.world)

    def _with_shadows(self, src: list[list[int]], shadow: set[int]) -> LayerCost:
        w, c = self.w, self.c
        plan = [
            [[(s if e in shadow else self.owner[e], n)] if n else [] for e, n in enumerate(row)]
            for s, row in enumerate(src)
        ]
        cost = _cost(w, c, _rows(plan, c.world), _a2a(src, plan, w, c))
        if shadow:
            bcast, red = _zeros(c.world), _zeros(c.world)
            for e in shadow:
                for r in range(c.world):
                    if r != self.owner[e]:
                        bcast[self.owner[e]][r] += w.expert_params * w.param_bytes
                        red[r][self.owner[e]] += w.expert_params * w.grad_bytes
            cost.exposed_s += transfer_s(bcast, c)
            cost.exposed_s += max(0.0, transfer_s(red, c) - 2 * attn_fwd_s(w, c))
            cost.bytes.update(spag=sum(map(sum, bcast)), sprs=sum(map(sum, red)))
        return cost

    def layer(self, bank: str, rows_E: list[int]) -> LayerCost:
        src = even_sources(rows_E, self.c.world)
        order = sorted(range(len(rows_E)), key=lambda e: (-rows_E[e], e))
        best = self._with_shadows(src, set())
        for k in range(1, len(order) + 1):
            trial = self._with_shadows(src, set(order[:k]))
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
