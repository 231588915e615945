"""FSSDP in the simulator, with the project's own planner and dispatcher.

Legend: W ranks, E experts, rows_E global rows per expert this step, src_WE rows per source
rank and expert. Ownership from `fssdp.sharding.balanced_uniform_sharding` (what the runtime
starts from), the placement from `fssdp.planner` (`plan_placement` on the `LoadEstimator`'s
estimate, `plan_exact`, or `calibrate`; or the proposed [Note: costed degree]), the dispatch
from `fssdp.assign.assign_tokens`, so rows per rank and bytes per link are the real runtime's.
Overlap rules: [Note: overlap rules] in perf/sim_systems.py.

[Note: planner time on the critical path]
The planner and dispatcher run for real, in-process, on the count matrix as a tensor (what the
runtime all-gathers), timed with time.perf_counter: the plan (predict: at the step start, for
this step, overlappable with nothing; exact and calibrate: after routing, before dispatch),
the assignment and one rank's views of it (rows per rank, its send and receive counts, the
experts it receives). That wall time is `plan_s` and is part of every layer's step time: the
runtime waits for it. (With more ranks than experts, [Note: more ranks than experts] in
perf/sim_run.py, the planner runs at the group's size, as the runtime would.) The timer is
the thread's CPU time, not the wall clock: on this shared 2-core machine the wall clock also
counts other processes' time slices, which a dedicated host CPU would not see.

[Note: copies per link]
The overlap degree t counts the expert copies that fit behind the attention forward. Copies
inside a node use the device links (NVLink), copies across nodes the node's NIC, and the tree
spAG ([Note: pricing the runtime's spAG] in perf/sim_spag.py) crosses a NIC once per expert and
node: replicating the top t experts to every rank puts about t copies on each NIC and on each
device link, so t = floor(T_overlap * min(intra_bw, inter_bw) / S_e), the slower link's budget.
The earlier rule priced every copy at a device's share of the NIC (inter_bw / per_node), which
at 8 GPUs per node cut t eightfold (no copy fitted behind an attention forward at 100-400 Gb/s).
"""

from __future__ import annotations

import time

import torch

from collectives.placement import Placement, Topology
from fssdp.assign import assign_tokens, rows_per_rank
from fssdp.plan_local import Locality
from fssdp.planner import LoadEstimator, calibrate, overlap_degree, plan_exact, plan_placement
from fssdp.sharding import balanced_uniform_sharding
from perf.cost_model import Cluster, Workload, attn_fwd_s, even_sources, expert_s
from perf.sim_layer import LayerCost, a2a_cost, layer_cost
from perf.sim_spag import spag_exposed_s

# [Note: costed degree]
# A proposed replacement of the runtime's overlap-degree rule (t = copies that fit behind the
# attention forward): for t in {0, 1, 2, 4, …}, plan with the estimated loads and m = max(cap, t),
# predict the slowest rank's expert time plus the exposed spAG/spRS time, keep the cheapest. It
# accepts an exposed transfer when the balance it buys is worth more, as FasterMoE's shadowing
# does, but judges on the estimate (before routing), so the transfer can still be prefetched.


class FSSDPSim:
    """The real planner and dispatcher; see [Note: overlap rules]."""

    name = "fssdp"

    def __init__(
        self,
        w: Workload,
        c: Cluster,
        memory_cap: int = 2,
        window: int = 5,
        mode: str = "exact",  # the runtime's default parallel.plan_mode
        lookahead: bool = False,
        node_local: bool = True,  # the runtime's default parallel.node_local_slots=-1
    ) -> None:
        self.w, self.c, self.m, self.mode, self.lookahead = w, c, memory_cap, mode, lookahead
        # [Note: node-local replicas] as the runtime weighs them (fssdp/strategies/fssdp.py)
        token = 2 * (w.d_model + w.d_model) * w.act_bytes
        copy = w.expert_params * (w.param_bytes + w.grad_bytes)
        self.locality = Locality(token, copy, memory_cap - 1) if node_local else None
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
        """Bytes/s of one expert's copies per link, budgeted per link ([Note: copies per
        link]): the device link inside a node, the node's NIC across nodes (a tree crosses it
        once per expert), the slower of the two."""
        c = self.c
        return c.intra_bw if c.nodes == 1 else min(c.intra_bw, c.inter_bw)

    def _placement(self, own: Placement, est: LoadEstimator, src: torch.Tensor) -> Placement:
        if self.mode == "exact":
            return plan_exact(src, own, self.topo, self.m, self.locality)
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
        t0 = time.thread_time()  # [Note: planner time on the critical path]
        p1 = self._placement(own, est, src)
        p2 = self._calibrated(p1, src) if self.mode == "calibrate" else p1
        t1 = time.thread_time()
        plan = assign_tokens(src, p2, self.topo)
        rows = plan.rows_per_rank().tolist()
        plan.send_counts(0), plan.recv_counts(0), plan.received_experts(0)
        plan_s = time.thread_time() - t0
        est.update(rows_E)
        cost = layer_cost(self.w, self.c, rows, a2a_cost(src, plan, self.w, self.c))
        cost.plan_s = plan_s
        hide = self._hide_fwd_s()
        if self.mode == "exact":  # [Note: the gather overlaps the dispatch] (fssdp/executor.py)
            hide = (plan_s - (t1 - t0)) + cost.a2a_s / 4  # the assignment, the dispatch
        if p2 is p1:
            self._materialize(cost, own, p1, hide)
        else:  # calibration: the pairs p1 lacks gathered after routing, not hidden; p2's
            # gradients reduced (p2 may drop some of p1's replicas, Replicas.extend)
            self._materialize(cost, own, p1, self._hide_fwd_s(), ("spag",))
            self._materialize(cost, p1, p1.with_pairs(*p2.pairs_P()), 0.0, ("spag",))
            self._materialize(cost, own, p2, 0.0, ("sprs",))
        self.prev_fwd_s = (cost.dense_s + cost.expert_s + cost.a2a_s) / 3
        return cost

    def _calibrated(self, p1: Placement, src: torch.Tensor) -> Placement:
        """The runtime's `calibrate` mode: extra copies for the true counts when they pay."""
        w, c = self.w, self.c
        per_row = expert_s(1, w, c)
        return calibrate(p1, src, self.topo, self.m, self._bytes_e(), self._spag_bw(), per_row)

    def _bytes_e(self) -> int:
        return self.w.expert_params * self.w.param_bytes

    def _materialize(
        self,
        cost: LayerCost,
        base: Placement,
        p: Placement,
        hide: float,
        what: tuple[str, ...] = ("spag", "sprs"),
    ) -> None:
        """spAG base → p (hidden behind `hide` seconds) and the spRS back (behind the attention
        backward), priced as the runtime's schedules ([Note: pricing the runtime's spAG]);
        `what` says which of the two to charge."""
        w, c = self.w, self.c
        copies = int((p.num_holders_E() - base.num_holders_E()).sum())
        if not copies:
            return
        per_copy = {"spag": w.expert_params * w.param_bytes, "sprs": w.expert_params * w.grad_bytes}
        hides = {"spag": hide, "sprs": 2 * attn_fwd_s(w, c)}
        jobs = [(per_copy[k], hides[k]) for k in what]
        for k, t in zip(what, spag_exposed_s(base, p, c, jobs)):
            cost.exposed_s += t
            cost.bytes[k] = cost.bytes.get(k, 0.0) + copies * per_copy[k]
