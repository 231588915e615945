"""How an expert bank runs under EP and FSSDP: materialise, dispatch, compute, combine.

Legend: N rows this rank sends into the bank, M rows it computes, D row width, O output width,
E experts of the bank, W ranks, H experts this rank holds this step, S elements per expert.

[Note: one step of a bank]
1. `prefetch()` (a forward pre-hook on the layer that contains the bank) issues the async
   SparseAllGather of this step's placement P1 while the layer's dense work (attention) runs.
   In `exact` mode nothing is issued early: P1 is planned from the true counts in the call.
2. Each call all-gathers the [W, E] count matrix, computes the topology-aware assignment
   (identical on every rank, no negotiation), sends rows to their replicas by one all-to-all,
   runs the grouped expert compute on the held experts, and brings the results back.
3. The held experts are one leaf tensor per step; every call's backward accumulates into its
   `.grad`, and autograd runs the leaf's accumulation once, after the bank's last backward use:
   its hook issues the async SparseReduceScatter to the owners ([Note: sparse process group]).
4. `finish()` (after backward) waits for the reduce; owners get the mean-over-ranks gradient.

[Note: three process groups]
Collectives must be issued in the same order on every rank within a group. Three sources issue
them, each in an order fixed by the model's structure, but their interleaving is not: it depends
on the autograd engine's schedule, which depends on the expert part of the graph, which differs
per rank (a rank with no rows for an expert has no nodes for it). So each source has its group:
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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from collectives.dispatch import all_gather_counts, all_to_all_rows
from collectives.placement import Placement, Topology
from collectives.sparse import SparseHandle, sparse_all_gather, sparse_reduce_scatter
from fssdp.assign import assign_tokens
from fssdp.phases import NULL_TIMER, PhaseTimer, time_backward_chain
from fssdp.planner import calibrate, plan_exact
from fssdp.store import BankShard
from models.common.experts import ExpertBank


@dataclass
class ExecOptions:
    plan_mode: str  # predict | exact | calibrate (EP: predict with no replicas)
    memory_cap: int  # m: extra expert slots per rank
    rematerialize: bool  # free held experts after forward, gather again before backward
    algorithm: str  # sparse collective algorithm: auto | a2a | tree
    timeout_s: float


@dataclass
class StepStats:
    """What one bank did this step on this rank (reset every step)."""

    counts_E: Tensor | None = None  # global tokens per expert, summed over calls
    rows_computed: int = 0  # rows this rank's expert compute processed
    expert_time_s: float = 0.0
    bytes: dict[str, int] = field(default_factory=lambda: {"spag": 0, "sprs": 0, "a2a": 0})
    prefetch_t: float | None = None  # when the predicted spAG was issued
    overlap_s: float = 0.0  # dense work the spAG hid behind (issue → first call)
    transfer_s: float = 0.0  # issue → completion of the wait
    spag_bytes_recv: int = 0
    placement: Placement | None = None  # P1 this step ran with (None: the bank was not used)


class _Tie(torch.autograd.Function):
    """Pass `y` through and give each of `others` a zero gradient.

    A rank that computes no rows gets `y` from a fresh zero tensor, disconnected from the rows
    it received and from the held experts. Its autograd would then skip the dispatch
    all-to-all's backward and the held experts' accumulation (which starts the reduce), while
    the other ranks wait in those collectives: a hang (seen for real under skewed routing).
    Tying `y` to both keeps every rank's backward issuing the same collectives.
    """

    @staticmethod
    def forward(ctx, y: Tensor, *others: Tensor) -> Tensor:  # noqa: ANN001
        ctx.shapes = [o.shape for o in others]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
        return (grad_y, *(grad_y.new_zeros(shape) for shape in ctx.shapes))


class BankRuntime:
    """The executor of one bank (`bank.executor = runtime`)."""

    def __init__(
        self,
        shard: BankShard,
        topology: Topology,
        opts: ExecOptions,
        rank: int,
        sparse_group: dist.ProcessGroup | None,
        dispatch_group: dist.ProcessGroup | None,
    ) -> None:
        self.shard = shard
        self.topology = topology
        self.opts = opts
        self.rank = rank
        self.world = topology.world_size
        self.sparse_group = sparse_group
        self.dispatch_group = dispatch_group
        # The placement the planner chose for the next step (predict/calibrate modes only:
        # exact mode plans inside the step).
        self.next_placement: Placement = shard.ownership
        # Expert compute seconds per row (calibrate mode), agreed over ranks by the strategy:
        # a rank deciding from its own clock could plan differently and hang the others.
        self.time_per_row_s = 1e-6
        self.bandwidth = 1e9  # measured bytes/s of the sparse transfers (agreed over ranks)
        self.phases: PhaseTimer = NULL_TIMER  # the trainer's timer (timing points only)
        self._reset()

    def _reset(self) -> None:
        self.placement: Placement | None = None  # this step's P1
        self.held: Tensor | None = None  # leaf [H, S] of this step's held experts
        self.freed = False  # rematerialisation dropped the held storage
        self.pending: SparseHandle | None = None  # spAG in flight
        self.reduce: SparseHandle | None = None  # spRS in flight
        self.stats = StepStats()

    @property
    def name(self) -> str:
        return self.shard.layout.bank_name

    # -- materialisation ---------------------------------------------------------------------
    def _spag(
        self, rows_FS: Tensor, src: Placement, dst: Placement, what: str, async_op: bool
    ) -> SparseHandle:
        """SparseAllGather on the sparse group, counted in this step's bytes."""
        handle = sparse_all_gather(
            rows_FS,
            src,
            dst,
            self.sparse_group,
            async_op=True,
            algorithm=self.opts.algorithm,
            phase=f"{what} {self.name}",
            timeout_s=self.opts.timeout_s,
            topology=self.topology,
        )
        assert isinstance(handle, SparseHandle)
        self.stats.bytes["spag"] += handle.stats.bytes_sent
        self.stats.spag_bytes_recv += handle.stats.bytes_recv
        if not async_op:
            handle.wait()
        return handle

    def _gather(self, placement: Placement) -> SparseHandle:
        return self._spag(self.shard.rows_OS, self.shard.ownership, placement, "spag", True)

    def prefetch(self) -> None:
        """Issue this step's spAG early (forward pre-hook of the bank's layer)."""
        if not torch.is_grad_enabled() or self.opts.plan_mode == "exact":
            return
        if self.placement is not None or self.pending is not None:
            return  # already issued this step (a reused layer runs its pre-hook again)
        self.placement = self.next_placement
        self.stats.prefetch_t = time.perf_counter()
        with self.phases.phase("spag"):
            self.pending = self._gather(self.placement)

    def _materialize(self, counts_WE: list[list[int]]) -> Tensor:
        """The held experts of this step as a leaf tensor (gathering them if needed)."""
        with self.phases.phase("spag"):
            return self._materialize_untimed(counts_WE)

    def _materialize_untimed(self, counts_WE: list[list[int]]) -> Tensor:
        if self.held is not None:
            if self.freed:
                self._refill()
            return self.held
        now = time.perf_counter()
        if self.placement is None:  # exact mode, or no layer pre-hook ran
            self.placement = self._plan_now(counts_WE)
            self.pending = self._gather(self.placement)
        elif self.stats.prefetch_t is not None:
            self.stats.overlap_s = now - self.stats.prefetch_t
        assert self.pending is not None
        raw_HS = self.pending.wait()
        self.pending = None
        done = time.perf_counter()
        if self.stats.prefetch_t is not None:
            self.stats.transfer_s = done - self.stats.prefetch_t
        if self.opts.plan_mode == "calibrate":
            raw_HS = self._calibrate(raw_HS, counts_WE)
        held = raw_HS.detach().requires_grad_(True)
        held.register_post_accumulate_grad_hook(self._start_reduce)
        self.held = held
        return held

    def _plan_now(self, counts_WE: list[list[int]]) -> Placement:
        if self.opts.plan_mode != "exact":  # predict/calibrate without a layer pre-hook
            return self.next_placement
        if self.opts.memory_cap <= 0:
            return self.shard.ownership
        return plan_exact(counts_WE, self.shard.ownership, self.topology, self.opts.memory_cap)

    def _calibrate(self, raw_HS: Tensor, counts_WE: list[list[int]]) -> Tensor:
        """Re-plan with the true counts; gather the extra replicas when that pays."""
        assert self.placement is not None
        better = calibrate(
            self.placement,
            counts_WE,
            self.topology,
            self.opts.memory_cap,
            self.shard.layout.row_bytes(),
            self.bandwidth,
            self.time_per_row_s,
        )
        if better == self.placement:
            return raw_HS
        out = self._spag(raw_HS, self.placement, better, "spag-calibrate", False).wait()
        self.placement = better
        return out

    def _free(self) -> None:
        """Rematerialisation: drop the held storage; autograd's saved views keep the storage
        object, which `_refill` fills again before backward (no version bump: storage ops)."""
        assert self.held is not None
        self.held.untyped_storage().resize_(0)
        self.freed = True

    def _refill(self) -> None:
        with self.phases.phase("spag"):
            self._refill_untimed()

    def _refill_untimed(self) -> None:
        assert self.held is not None and self.placement is not None
        fresh = self._spag(
            self.shard.rows_OS, self.shard.ownership, self.placement, "spag-rematerialize", False
        ).wait()
        storage = self.held.untyped_storage()
        storage.resize_(fresh.untyped_storage().nbytes())
        storage.copy_(fresh.untyped_storage())
        self.freed = False

    def _before_backward(self, grad: Tensor) -> Tensor:
        if self.freed:
            self._refill()
        return grad

    # -- gradients ---------------------------------------------------------------------------
    def _start_reduce(self, held: Tensor) -> None:
        """After the bank's last backward use: fold the copies' gradients into the owners."""
        with self.phases.phase("sprs"):
            self._issue_reduce(held)

    def _issue_reduce(self, held: Tensor) -> None:
        assert held.grad is not None and self.placement is not None
        self.reduce = sparse_reduce_scatter(
            held.grad,
            self.placement,
            self.shard.ownership,
            self.sparse_group,
            async_op=True,
            algorithm=self.opts.algorithm,
            phase=f"sprs {self.name}",
            timeout_s=self.opts.timeout_s,
            topology=self.topology,
        )
        self.stats.bytes["sprs"] += self.reduce.stats.bytes_sent

    def finish(self) -> None:
        """Wait for the reduce; owners get the mean-over-ranks gradient (DDP's convention)."""
        if self.reduce is not None:
            with self.phases.phase("sprs"):
                self.shard.grad_OS = self.reduce.wait() / self.world
        elif self.held is not None:
            raise RuntimeError(
                f"rank {self.rank}: bank {self.name} was used but its gradient "
                "reduce never started (was backward run?)"
            )

    def end_step(self) -> StepStats:
        stats = self.stats
        stats.placement = self.placement
        self._reset()
        return stats

    # -- the call ----------------------------------------------------------------------------
    def __call__(self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        E = self.shard.layout.num_experts
        counts_E = torch.bincount(expert_N, minlength=E)
        with self.phases.phase("dispatch"):
            counts_WE = all_gather_counts(
                counts_E,
                self.dispatch_group,
                phase=f"counts {self.name}",
                timeout_s=self.opts.timeout_s,
            ).cpu()
        counts = counts_WE.tolist()  # once: the planner and the assignment work on lists
        if not torch.is_grad_enabled():  # evaluation: owners compute, nothing is kept
            placement = self.shard.ownership
            held = self.shard.rows_OS
        else:
            held = self._materialize(counts)
            placement = self.placement
        assert placement is not None
        total = counts_WE.sum(0)
        self.stats.counts_E = total if self.stats.counts_E is None else self.stats.counts_E + total
        with self.phases.phase("dispatch"):
            plan = assign_tokens(counts, placement, self.topology)
        y_ND = self._dispatch_compute_combine(bank, x_ND, expert_N, plan, placement, held)
        if torch.is_grad_enabled() and self.opts.rematerialize:
            self._free()
            y_ND.register_hook(self._before_backward)
        return y_ND

    def _dispatch_compute_combine(
        self,
        bank: ExpertBank,
        x_ND: Tensor,
        expert_N: Tensor,
        plan: list[list[list[tuple[int, int]]]],
        placement: Placement,
        held_HS: Tensor,
    ) -> Tensor:
        tok = self.phases.begin("dispatch")
        send_idx_N, send_counts = _send_order(expert_N, plan[self.rank], self.world)
        recv_experts, recv_counts = _received(plan, self.rank, self.world)
        phase = f"dispatch {self.name}"
        x_sent_ND = x_ND.index_select(0, send_idx_N)
        x_MD = all_to_all_rows(
            x_sent_ND,
            send_counts,
            recv_counts,
            self.dispatch_group,
            phase=phase,
            timeout_s=self.opts.timeout_s,
        )
        lut = torch.full((placement.num_experts,), -1, dtype=torch.long)
        held_ids = placement.held(self.rank)
        lut[torch.tensor(held_ids, dtype=torch.long)] = torch.arange(len(held_ids))
        local_M = lut[torch.tensor(recv_experts, dtype=torch.long)].to(x_ND.device)
        self.phases.end(tok)
        tok = self.phases.begin("expert")
        t0 = time.perf_counter()
        y_MO = bank.compute(self.shard.layout.views(held_HS), x_MD, local_M)
        self.stats.expert_time_s += time.perf_counter() - t0
        self.phases.end(tok)
        self.stats.rows_computed += x_MD.shape[0]
        if x_MD.shape[0] == 0 and torch.is_grad_enabled():
            y_MO = (
                _Tie.apply(y_MO, x_MD, held_HS) if held_HS.requires_grad else _Tie.apply(y_MO, x_MD)
            )
        tok = self.phases.begin("combine")
        y_back_NO = all_to_all_rows(
            y_MO,
            recv_counts,
            send_counts,
            self.dispatch_group,
            phase=f"combine {self.name}",
            timeout_s=self.opts.timeout_s,
        )
        self.phases.end(tok)
        time_backward_chain(
            self.phases, [y_back_NO, y_MO, x_MD, x_sent_ND], ["combine", "expert", "dispatch"]
        )
        inverse_N = torch.empty_like(send_idx_N)
        inverse_N[send_idx_N] = torch.arange(send_idx_N.numel(), device=send_idx_N.device)
        sent_rows = sum(send_counts) - send_counts[self.rank]
        back_rows = sum(recv_counts) - recv_counts[self.rank]
        row_bytes = x_ND.element_size()
        passes = 2 if torch.is_grad_enabled() else 1  # backward repeats both exchanges
        self.stats.bytes["a2a"] += (
            passes * row_bytes * (sent_rows * x_ND.shape[1] + back_rows * y_MO.shape[1])
        )
        return y_back_NO.index_select(0, inverse_N)


def _send_order(
    expert_N: Tensor, plan_src: list[list[tuple[int, int]]], world: int
) -> tuple[Tensor, list[int]]:
    """Row order for the all-to-all (grouped by destination) and rows per destination.

    A source's rows of expert e are cut, in their original order, into the plan's chunks."""
    order_N = torch.argsort(expert_N, stable=True)
    dsts, sizes = [], []
    send_counts = [0] * world
    for chunks in plan_src:
        for dst, n in chunks:
            dsts.append(dst)
            sizes.append(n)
            send_counts[dst] += n
    dst_sorted_N = torch.repeat_interleave(
        torch.tensor(dsts, dtype=torch.long), torch.tensor(sizes, dtype=torch.long)
    ).to(expert_N.device)
    perm_N = torch.argsort(dst_sorted_N, stable=True)
    return order_N.index_select(0, perm_N), send_counts


def _received(
    plan: list[list[list[tuple[int, int]]]], me: int, world: int
) -> tuple[list[int], list[int]]:
    """Expert id of every row this rank receives (by source rank, then expert), and counts."""
    experts: list[int] = []
    recv_counts = [0] * world
    for src in range(world):
        for e, chunks in enumerate(plan[src]):
            for dst, n in chunks:
                if dst == me:
                    experts.extend([e] * n)
                    recv_counts[src] += n
    return experts, recv_counts
