"""The FSSDP executor of one bank: place, materialise, dispatch, compute, fold gradients back.

Legend: N rows this rank sends into the bank, M rows it computes, E experts of the bank, W
ranks, K experts this rank owns, R replicas it holds this step, S elements per expert.

[Note: one step of a bank]
1. `prefetch()` (a forward pre-hook on the layer that contains the bank) asks the policy for a
   placement to prefetch (predict, calibrate) and issues its spAG while the layer's dense work
   (attention) runs. Exact mode prefetches nothing.
2. The first call of the step all-gathers the [W, E] count matrix (issued early when the model
   announced the call, [Note: announced routing] in fssdp/counts.py); the policy turns it into
   the placement the bank runs with this step (exact: planned now; calibrate: the prefetched
   one plus what pays; predict: the prefetched one). Later calls of a multi-call bank reuse it.
3. Each call computes the topology-aware assignment (identical on every rank), sends rows to
   their holders by one all-to-all, computes with the owned parameters (their gradients
   accumulate directly) and the replica rows, and brings the results back.
4. The replicas' gradients reach the owners by spRS, issued from the replica leaf's
   post-accumulate hook ([Note: replica states] in fssdp/replicas.py); `finish()` adds them to
   the owners' gradients and divides by W (DDP's mean convention).
Without grad (evaluation) the bank runs as EP: owners compute, nothing is gathered or kept.

[Note: a step without replicas runs as EP]
When the step's placement is the ownership (the cost gate found that replication cannot pay,
[Note: when replication pays] in fssdp/policy.py; or m = 0), no rank holds a replica and no
rank transfers anything (placements are identical on every rank). Each call then takes EP's
path exactly: the static route (every row to its owner) instead of the assignment, the owned
parameters' compute with no replica leaf, no tie to it and no gradient hook, so the step costs
what EP's does plus the gate's O(W E) test at the first call.

[Note: the gather overlaps the dispatch]
Exact mode plans after routing, so its spAG is on the critical path. The first call of a step
issues it (async, sparse group) and does not wait: the assignment (host work) and the token
all-to-all (dispatch group) run while the copies travel, and the call waits for its replicas
only between the dispatch and the expert compute (`exchange_compute`'s `before_compute`, on
every rank: each rank computes once per call, even with no rows). Its rounds run on the
sparse group's worker thread meanwhile, a tree's relays included ([Note: rounds in the
background] in collectives/progress.py). The owners' rows and the count matrix are the same as
before, so the placement, the assignment and every row's result are unchanged; only the order
of the host's work and the two groups' collectives moved.

[Note: three process groups]
Collectives must be issued in the same order on every rank within a group. Three sources issue
them, each in an order fixed by the model's structure, but their interleaving is not: it depends
on the autograd engine's schedule, which depends on the expert part of the graph, which differs
per rank (a rank with no rows for an expert has no nodes for it). So each source has its group
(fssdp/groups.py):
- the default group: FSDP2's all-gathers / reduce-scatters and the global-batch statistics;
- the dispatch group: count all-gathers and the token all-to-alls (a chain along the residual
  stream, forward and backward);
- the sparse group: SparseAllGather / ReduceScatter (layer order forward, reverse backward), which
  also lets them overlap compute.
(Seen for real: with dispatch on the default group, FSDP2's backward reduce-scatter and a
dispatch all-to-all crossed on two ranks and the job hung until the timeout named the phase.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from collectives.placement import Placement
from fssdp.assign import assign_tokens
from fssdp.counts import CountExchange
from fssdp.dispatch import CallStats, Compute, Tie, exchange_compute
from fssdp.ep import local_index
from fssdp.policy import PlacementPolicy
from fssdp.precision import rows, weights
from fssdp.recompute import recompute_counts, replaying
from fssdp.replicas import Replicas, ReplicaState
from fssdp.route import StaticRoute
from models.common.experts import ExpertBank


@dataclass
class BankStep:
    """What one bank did this step on this rank (the strategy's end-of-step input)."""

    counts_E: Tensor | None  # global tokens per expert, summed over the step's calls
    placement: Placement | None  # P1 the step ran with (None: not used in training)
    overlap_s: float  # prefetch issue → first wait (dense work the spAG hid behind)
    rows_computed: int
    expert_time_s: float
    bytes: dict[str, int]  # sent this step: spag, sprs, a2a
    spag_bytes_recv: int


class FSSDPExecutor:
    """`bank.executor` under `parallel=fssdp`."""

    def __init__(
        self,
        bank: ExpertBank,
        policy: PlacementPolicy,
        replicas: Replicas,
        counts: CountExchange,
        rematerialize: bool,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.bank, self.policy, self.replicas, self.ex = bank, policy, replicas, counts.ex
        self.count_exchange = counts  # the per-call count matrices ([Note: announced routing])
        self.rematerialize = rematerialize
        # bf16: owners compute with casts of their rows, replicas arrive in bf16
        # ([Note: mixed precision of experts] in fssdp/precision.py)
        self.compute_dtype = compute_dtype
        # EP's tables (owner and local index per expert) for the ownership they were made for
        self._static_for: Placement | None = None
        self._owner_E = self._lut_E = torch.empty(0, dtype=torch.long)
        self._reset()

    def _reset(self) -> None:
        self.counts_E: Tensor | None = None
        # [W, E] rows per rank per expert of the whole step, summed over the calls of the
        # statistics pre-pass (gradient accumulation): the plan of the step's placement.
        self.step_counts_WE: Tensor | None = None
        self.prepass = False
        self.used = False  # rows went through the bank in training this step (anywhere)
        self.prefetch_t: float | None = None
        self.overlap_s = 0.0

    # -- placement ----------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Issue this step's spAG early (forward pre-hook of the bank's layer)."""
        if not torch.is_grad_enabled() or not self.policy.prefetches:
            return
        if self.replicas.state is not ReplicaState.IDLE:
            return  # already issued this step (a reused layer runs its pre-hook again)
        planned = self.policy.before_forward()
        if planned is None:
            return
        self.prefetch_t = time.perf_counter()
        with self.ex.phases.phase("spag"):
            self.replicas.gather(self.policy.ownership, planned)

    def _materialize(self, counts_WE: Tensor, device: torch.device) -> Tensor | None:
        """The [R, S] replicas of this step, planning and gathering them if needed; None when
        this call issued their spAG and waits for it later ([Note: the gather overlaps the
        dispatch])."""
        rep, ph = self.replicas, self.ex.phases
        if self.step_counts_WE is not None:  # accumulation: plan the step, not the call
            counts_WE = self.step_counts_WE
        if rep.state is ReplicaState.IDLE:  # exact mode, or no layer pre-hook ran
            with ph.phase("plan"):
                planned = self.policy.after_routing(counts_WE, None)
            with ph.phase("spag"):
                rep.gather(self.policy.ownership, planned)
                if not rep.transfers:  # nothing in flight anywhere
                    return rep.wait(device, training=True)
            return None  # [Note: the gather overlaps the dispatch]
        if rep.state is not ReplicaState.GATHERING:
            with ph.phase("spag"):
                return rep.wait(device, training=True)  # a later call of this step
        if self.prefetch_t is not None:
            self.overlap_s = time.perf_counter() - self.prefetch_t
        prefetched = rep.placement
        with ph.phase("spag"):
            rows_RS = rep.wait(device, training=True)
        with ph.phase("plan"):
            better = self.policy.after_routing(counts_WE, prefetched)
        if better != prefetched:
            with ph.phase("spag"):
                rows_RS = rep.extend(better, device)
        return rows_RS

    # -- the call -----------------------------------------------------------------------------
    def __call__(self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        ex = self.ex
        counts_WE = recompute_counts(lambda: self.count_exchange.gather(expert_N))
        if replaying():
            return self._recompute(bank, x_ND, expert_N, counts_WE)
        if self.prepass:  # the step's statistics pre-pass: its counts plan the step
            prev = self.step_counts_WE
            self.step_counts_WE = counts_WE if prev is None else prev + counts_WE
            return self._call_static(bank, x_ND, expert_N, counts_WE)
        total_E = counts_WE.sum(0)
        self.counts_E = total_E if self.counts_E is None else self.counts_E + total_E
        if not torch.is_grad_enabled():  # evaluation: owners compute, nothing is kept
            return self._call_static(bank, x_ND, expert_N, counts_WE)
        self.used |= bool(total_E.sum() > 0)
        rows_RS = self._materialize(counts_WE, x_ND.device)
        if not self.replicas.transfers:  # [Note: a step without replicas runs as EP]
            return exchange_compute(ex, x_ND, expert_N, *self._static(bank, counts_WE))
        placement = self.replicas.placement
        assert placement is not None
        with ex.phases.phase("dispatch"):
            route = assign_tokens(counts_WE, placement, self.policy.topology)

        def held() -> Tensor:  # the step's replicas: the spAG's rows once it landed (HELD)
            return self.replicas.wait(x_ND.device, training=True)

        def land() -> None:  # after the dispatch all-to-all, before the expert compute
            with ex.phases.phase("spag"):
                held()

        ready = land if rows_RS is None else None  # None: already held (prefetched, or extended)
        compute = self._compute_fn(bank, placement, x_ND.device, held)
        y_ND = exchange_compute(ex, x_ND, expert_N, route, compute, before_compute=ready)
        if self.rematerialize:
            self.replicas.free()
            y_ND.register_hook(self._before_backward)
        return y_ND

    def _recompute(
        self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor, counts_WE: Tensor
    ) -> Tensor:
        """Activation checkpointing's second forward of a call ([Note: recomputation reuse] in
        fssdp/recompute.py): the step's placement and replicas (refilled once if
        rematerialisation freed them), the first forward's counts; nothing counted again."""
        rows_RS = self.replicas.wait(x_ND.device, training=True)
        placement = self.replicas.placement
        assert placement is not None
        if not self.replicas.transfers:  # as the first forward did
            route, compute = self._static(bank, counts_WE)
        else:
            with self.ex.phases.phase("dispatch"):
                route = assign_tokens(counts_WE, placement, self.policy.topology)
            compute = self._compute_fn(bank, placement, x_ND.device, lambda: rows_RS)
        return exchange_compute(self.ex, x_ND, expert_N, route, compute, recompute=True)

    def _call_static(
        self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor, counts_WE: Tensor
    ) -> Tensor:
        return exchange_compute(self.ex, x_ND, expert_N, *self._static(bank, counts_WE))

    def _static(self, bank: ExpertBank, counts_WE: Tensor) -> tuple[StaticRoute, Compute]:
        """EP's route and compute for the current owners (their tables made once per
        ownership: re-sharding replaces the policy's ownership object)."""
        own = self.policy.ownership
        if self._static_for is not own:
            dev = counts_WE.device
            self._owner_E = own.owner_E.to(dev)
            self._lut_E = local_index(bank.expert_ids or (), bank.num_experts, dev)
            self._static_for = own
        return StaticRoute(counts_WE, self._owner_E), self._owned_compute(bank, self._lut_E)

    def _owned_compute(self, bank: ExpertBank, lut_E: Tensor):  # noqa: ANN202
        """compute(x_MD, expert_M) over owned experts only: EP's compute."""

        def compute(x_MD: Tensor, expert_M: Tensor) -> Tensor:
            cdt = self.compute_dtype
            return bank.compute(weights(bank.stacked(), cdt), rows(x_MD, cdt), lut_E[expert_M])

        return compute

    def _compute_fn(  # noqa: ANN202
        self,
        bank: ExpertBank,
        placement: Placement,
        dev: torch.device,
        replicas: Callable[[], Tensor | None],
    ):
        """compute(x_MD, expert_M): owned experts with the parameters, the rest with replicas
        (`replicas()`: the [R, S] rows, there by the time compute runs)."""
        K = len(bank.expert_ids or ())
        lut_E = local_index(bank.expert_ids or (), bank.num_experts, dev)
        if not self.replicas.ids:  # no replica here this step: every row is an owned expert's
            return self._owned_only_fn(bank, lut_E, replicas)
        rep_E = local_index(tuple(self.replicas.ids), bank.num_experts, dev)
        key_E = torch.where(lut_E >= 0, lut_E, K + rep_E)  # owned first, then replicas

        def compute(x_MD: Tensor, expert_M: Tensor) -> Tensor:
            rows_RS = replicas()
            assert rows_RS is not None
            own_w = weights(bank.stacked(), self.compute_dtype)
            rep_w = self.replicas.layout.views(rows_RS)
            x_MD = rows(x_MD, self.compute_dtype)
            y_MO = bank.compute_parts((own_w, rep_w), x_MD, key_E[expert_M])
            return Tie.apply(y_MO, rows_RS) if rows_RS.requires_grad else y_MO

        return compute

    def _owned_only_fn(  # noqa: ANN202
        self, bank: ExpertBank, lut_E: Tensor, replicas: Callable[[], Tensor | None]
    ):
        """compute(x_MD, expert_M) of a rank that holds no replica: EP's compute (no split into
        owned and replica rows, no permutation and its inverse), tied to the empty replica leaf
        so that its gradient hook still starts the step's (empty) reduce."""
        owned = self._owned_compute(bank, lut_E)

        def compute(x_MD: Tensor, expert_M: Tensor) -> Tensor:
            rows_RS = replicas()
            assert rows_RS is not None
            y_MO = owned(x_MD, expert_M)
            return Tie.apply(y_MO, rows_RS) if rows_RS.requires_grad else y_MO

        return compute

    def _before_backward(self, grad: Tensor) -> Tensor:
        self.replicas.refill()
        return grad

    # -- end of backward / step ---------------------------------------------------------------
    @torch.no_grad()
    def finish(self, world: int) -> None:
        """Add the replicas' gradients to the owners', and make the sum the mean over ranks."""
        reduced_OS = self.replicas.finish()
        views = self.replicas.layout.views(reduced_OS) if reduced_OS is not None else {}
        for name, p in self.bank.named_parameters(recurse=False):
            if p.grad is None and (self.used or name in views):
                p.grad = torch.zeros_like(p)
            if p.grad is None:
                continue
            if name in views:
                p.grad.add_(views[name])
            p.grad.div_(world)

    def end_step(self) -> BankStep:
        stats, rep = self.ex.stats, self.replicas
        sent = {**stats.bytes, "spag": rep.bytes["spag"], "sprs": rep.bytes["sprs"]}
        recv = rep.spag_bytes_recv
        step = BankStep(
            self.counts_E, rep.end_step(), self.overlap_s, stats.rows_computed,
            stats.expert_time_s, sent, recv,
        )
        self.ex.stats = CallStats()
        self._reset()
        return step
