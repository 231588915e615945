"""SparseAllGather (spAG) and SparseReduceScatter (spRS) over torch.distributed.

Legend: S elements per expert (an expert's parameters flattened into one vector); on rank r,
F = len(placement_from.held(r)) input rows, T = len(placement_to.held(r)) output rows,
N = len(held_to - held_from) new rows, O = len(placement_to.owned(r)) owned rows, P replica rows
(held_from - owned). Rows are ordered by expert id. How the rows move is an algorithm's business
(collectives/algorithms/, [Note: algorithms] in base.py); these functions validate, lay out this
rank's rows (collectives/rows.py) and issue.

Return convention: with async_op=False both functions return `(tensor, CommStats)`; with
async_op=True a `SparseHandle` whose `.wait()` returns the tensor and whose `.stats` holds the
CommStats (known at issue time, since the schedule is a function of the placements). Either way
the rounds run on the group's worker thread ([Note: rounds in the background] in
collectives/progress.py), so an async call progresses through all its rounds while the caller
works.

# [Note: NCCL]
Only tensors' own devices are used, so CUDA tensors on an NCCL group take the same paths. Not
exercised on GPU yet. One NCCL rule matters to the tree: torch requires every rank of the group
to join a batch_isend_irecv that is the group's *first* collective, which a sparse round does
not do; any earlier collective on the group (the runtime's count exchange) satisfies it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from collectives.algorithms.base import Algorithm, build_all, cheapest
from collectives.comm import Call, CommStats
from collectives.placement import Placement, Topology
from collectives.progress import Job, submit
from collectives.rows import GatherRows, ReduceRows, RowSource, check_rows, output, put
from collectives.schedule import DEFAULT_COST, CostModel, check_gather, check_reduce

AlgoArg = str | Algorithm  # "auto", a registered name, or an instance from `choose`
Group = dist.ProcessGroup | None


class SparseHandle:
    """Pending sparse collective: `.wait()` finishes it (once) and returns the result."""

    def __init__(self, finish: Callable[[], torch.Tensor], stats: CommStats) -> None:
        self._finish: Callable[[], torch.Tensor] | None = finish
        self._result: torch.Tensor | None = None
        self.stats = stats

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        assert self._result is not None
        return self._result


Result = tuple[torch.Tensor, CommStats] | SparseHandle


def _check_world(p: Placement, call: Call) -> None:
    if p.world_size != call.world:
        raise ValueError(
            f"{call.op}: placement world_size {p.world_size} != group size {call.world}"
        )


def _resolve(
    algorithm: AlgoArg,
    small: Placement,
    big: Placement,
    row_bytes: int,
    cost_model: CostModel,
    topology: Topology | None,
) -> Algorithm:
    if isinstance(algorithm, Algorithm):
        if not algorithm.matches(small, big):
            raise ValueError(f"{algorithm!r} was chosen for other placements than this call's")
        return algorithm
    # small ⊆ big is known here (checked): no second subset test as in `choose`.
    return cheapest(build_all(small, big, algorithm, topology), row_bytes, cost_model)


def _result(job: Job, out: torch.Tensor, stats: CommStats, async_op: bool) -> Result:
    def done() -> torch.Tensor:
        job.wait()
        return out

    return SparseHandle(done, stats) if async_op else (done(), stats)


def sparse_all_gather(
    source: torch.Tensor | RowSource,
    placement_from: Placement,
    placement_to: Placement,
    group: Group = None,
    async_op: bool = False,
    *,
    algorithm: AlgoArg = "auto",
    out: torch.Tensor | None = None,
    new_only: bool = False,
    phase: str | None = None,
    timeout_s: float | None = None,
    topology: Topology | None = None,
    cost_model: CostModel = DEFAULT_COST,
) -> Result:
    """spAG: every (e, r) in placement_to \\ placement_from receives expert e from its owner.

    source: this rank's rows, either a tensor [F, S] following placement_from.held(rank)
      (= owned(rank) when placement_from is P0), or a callable `rows(expert_ids) -> [k, S]`.
      The callable is called at most once, before this function returns (never in wait()),
      with the ascending ids of the rows this rank needs from it: with new_only, only the
      experts it sends (an owner's experts with new holders; relays forward received rows);
      otherwise all of placement_from.held(rank). A callable source needs `out`.
    new_only: False -> the output [T, S] follows placement_to.held(rank) (rows already held
      are copied from the source); True -> it holds only the newly received rows, [N, S] in
      expert-id order of placement_to.held(rank) - placement_from.held(rank).
    out: a preallocated output of that shape, dtype and device, written in place (stale
      contents overwritten; with async_op, until wait() returns) and returned; else a new
      tensor.
    algorithm: "auto" (lowest modelled cost), a registered name, or an instance from
      `collectives.choose` for these placements (its schedule is reused).
    """
    call = Call.of(group, "sparse_all_gather", phase, timeout_s)
    check_gather(placement_from, placement_to)
    _check_world(placement_from, call)
    held_from = placement_from.held(call.rank)
    from_set = set(held_from)
    held_to = placement_to.held(call.rank)
    out_ids = [e for e in held_to if e not in from_set] if new_only else held_to
    if callable(source) and not isinstance(source, torch.Tensor):
        if out is None:
            raise ValueError(f"{call.op}: a callable source needs out= (it fixes S and dtype)")
        like, S = out, (out.shape[-1] if out.dim() else 0)
    else:
        check_rows(source, len(held_from), f"placement_from.held({call.rank})", call.op, call.rank)
        like, S = source, source.shape[1]
    out_XS = output(out, len(out_ids), S, like, call.op, call.rank)
    row_bytes = S * out_XS.element_size()
    algo = _resolve(algorithm, placement_from, placement_to, row_bytes, cost_model, topology)
    out_row = {e: i for i, e in enumerate(out_ids)}
    if isinstance(source, torch.Tensor):
        own_ids, own_XS = held_from, source.contiguous()
    else:
        sent = {e for rv in algo.view(call.rank, False).rounds for _, ex in rv.sends for e in ex}
        own_ids = held_from if not new_only else sorted(sent & from_set)
        own_XS = _call_source(source, own_ids, out_XS, call)
    if not new_only:  # rows already held are part of the output
        put(out_XS, [out_row[e] for e in own_ids], own_XS)
    rows = GatherRows(out_XS, out_row, own_XS, {e: i for i, e in enumerate(own_ids)})
    job = submit(call.group, call.world, lambda: algo.issue_gather(call, rows)())
    return _result(job, out_XS, algo.stats(call.rank, row_bytes, reduce=False), async_op)


def _call_source(source: RowSource, ids: list[int], like: torch.Tensor, call: Call) -> torch.Tensor:
    if not ids:
        return like.new_empty(0, like.shape[1])
    got = source(list(ids))
    if (
        not isinstance(got, torch.Tensor)
        or tuple(got.shape) != (len(ids), like.shape[1])
        or got.dtype != like.dtype
        or got.device != like.device
    ):
        what = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ValueError(
            f"{call.op}: rank {call.rank}: source({ids[:8]}...) must return [{len(ids)}, "
            f"{like.shape[1]}] {like.dtype} on {like.device}, got {what}"
        )
    return got.contiguous()


def sparse_reduce_scatter(
    held_FS: torch.Tensor,
    placement_from: Placement,
    placement_to: Placement,
    group: Group = None,
    async_op: bool = False,
    *,
    algorithm: AlgoArg = "auto",
    out: torch.Tensor | None = None,
    replicas_only: bool = False,
    accumulate: bool = False,
    phase: str | None = None,
    timeout_s: float | None = None,
    topology: Topology | None = None,
    cost_model: CostModel = DEFAULT_COST,
) -> Result:
    """spRS: each owner receives the sum of the copies of its experts over their holders.

    held_FS: this rank's copies, [F, S] following placement_from.held(rank); with
      replicas_only, [P, S] following its replicas only, placement_from.held(rank) -
      placement_to.owned(rank). Not modified.
    Output [O, S] follows placement_to.owned(rank) (placement_to must be ownership only):
      the sum over all holders; with replicas_only, over the *other* holders only (the owner's
      own gradient is already in its parameter's .grad), and zeros for an owned expert with no
      replica. Written into `out` when given (with async_op, in wait()).
    accumulate: (needs out) add onto what `out` holds instead: out + c1 + c2 + ..., left to
      right, c the terms the owner folds (a2a: each holder's copy in rank order; tree: the
      partial sums it receives, round by round). With replicas_only and out=the owned rows'
      flat .grad, the replicas' gradients are folded in with no extra copy.

    # [Note: deterministic sums]
    Nothing is reduced inside a collective. a2a sums each expert's copies in ascending holder
    rank order; tree sums in its fixed binomial order (L = owner, then holders by cyclic rank
    distance: (L0 + L1) + (L2 + L3) for 4 holders; with replicas_only L0 is absent: L1 + (L2 +
    L3)). Both are bit-reproducible run to run; they agree with each other exactly only where
    the additions are exact (e.g. integer floats).
    """
    call = Call.of(group, "sparse_reduce_scatter", phase, timeout_s)
    check_reduce(placement_from, placement_to)
    _check_world(placement_from, call)
    owned = placement_to.owned(call.rank)
    in_ids = placement_from.held(call.rank)
    what = f"placement_from.held({call.rank})"
    if replicas_only:
        owned_set = set(owned)
        in_ids = [e for e in in_ids if e not in owned_set]
        what += f" - placement_to.owned({call.rank})"
    check_rows(held_FS, len(in_ids), what, call.op, call.rank)
    if accumulate and out is None:
        raise ValueError(f"{call.op}: accumulate=True needs out= (what to add onto)")
    x_FS = held_FS.contiguous()
    out_OS = output(out, len(owned), x_FS.shape[1], x_FS, call.op, call.rank)
    row_bytes = x_FS.shape[1] * x_FS.element_size()
    algo = _resolve(algorithm, placement_to, placement_from, row_bytes, cost_model, topology)
    rows = ReduceRows(x_FS, {e: i for i, e in enumerate(in_ids)}, out_OS, owned, accumulate)
    job = submit(call.group, call.world, lambda: algo.issue_reduce(call, rows)())
    return _result(job, out_OS, algo.stats(call.rank, row_bytes, reduce=True), async_op)
