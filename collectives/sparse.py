"""SparseAllGather (spAG) and SparseReduceScatter (spRS) over torch.distributed (DESIGN.md §2).

Legend: S elements per expert (an expert's parameters flattened into one vector); on rank r,
F = len(placement_from.held(r)) input rows, T = len(placement_to.held(r)) output rows,
O = len(placement_to.owned(r)) owned rows, R = rows received. Rows are ordered by expert id.

Return convention: with async_op=False both functions return `(tensor, CommStats)`; with
async_op=True a `SparseHandle` whose `.wait()` returns the tensor and whose `.stats` holds the
CommStats (known at issue time, since the schedule is a function of the placements).

# [Note: NCCL]
Only tensors' own devices are used, so CUDA tensors on an NCCL group take the same paths. Not
exercised on GPU yet. One NCCL rule matters to the tree: torch requires every rank of the group
to join a batch_isend_irecv that is the group's *first* collective, which a sparse round does
not do; any earlier collective on the group (the runtime's count exchange) satisfies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist

from collectives.comm import CommStats, as_bytes, global_rank, group_rank_world, guarded, wait_all
from collectives.placement import Placement, Topology
from collectives.schedule import (
    DEFAULT_COST,
    Algorithm,
    CostModel,
    Schedule,
    check_gather,
    check_reduce,
    choose_algorithm,
    direct_schedule,
    reverse_schedule,
    tree_schedule,
)

AlgoArg = Literal["auto", "a2a", "tree"]
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


def _stats(sched: Schedule, rank: int, row_bytes: int) -> CommStats:
    sent = sum(1 for rnd in sched for _, s, _ in rnd if s == rank)
    recv = sum(1 for rnd in sched for _, _, d in rnd if d == rank)
    return CommStats(sent * row_bytes, recv * row_bytes)


def _check_input(x: torch.Tensor, pf: Placement, rank: int, world: int, op: str) -> None:
    if pf.world_size != world:
        raise ValueError(f"{op}: placement world_size {pf.world_size} != group size {world}")
    rows = len(pf.held(rank))
    if x.dim() != 2 or x.shape[0] != rows:
        raise ValueError(
            f"{op}: rank {rank} expects input [{rows}, S] (placement_from.held({rank})), "
            f"got {list(x.shape)}"
        )


def _pick(
    algorithm: AlgoArg,
    pf: Placement,
    pt: Placement,
    row_bytes: int,
    cost_model: CostModel,
    topo: Topology | None,
) -> Algorithm:
    if algorithm == "auto":
        return choose_algorithm(
            pf, pt, expert_bytes=row_bytes, cost_model=cost_model, topology=topo
        )
    if algorithm not in ("a2a", "tree"):
        raise ValueError(f"algorithm must be 'auto', 'a2a' or 'tree', got {algorithm!r}")
    return algorithm


def _a2a(
    send_XS: torch.Tensor,
    recv_RS: torch.Tensor,
    rnd: list[tuple[int, int, int]],
    rank: int,
    world: int,
    group: Group,
    ctx: tuple[str, str | None, float | None],
) -> Callable[[], None]:
    """Issue one uneven all_to_all_single carrying the transfers of `rnd`; return its wait.

    `send_XS` holds this rank's outgoing rows sorted by (dst, e); `recv_RS` (contiguous) gets the
    incoming rows sorted by (src, e). Splits follow from `rnd`, which every rank knows, so no
    counts are exchanged first.
    """
    op, phase, timeout_s = ctx
    send_cnt, recv_cnt = [0] * world, [0] * world
    for _, s, d in rnd:
        if s == rank:
            send_cnt[d] += 1
        if d == rank:
            recv_cnt[s] += 1
    send_XB, recv_RB = as_bytes(send_XS), as_bytes(recv_RS)

    def issue() -> dist.Work | None:
        return dist.all_to_all_single(recv_RB, send_XB, recv_cnt, send_cnt, group, async_op=True)

    work = guarded(issue, op, phase, group, timeout_s)
    return lambda: wait_all([work], op, phase, group, timeout_s)


def _output(out: torch.Tensor | None, rows: int, like: torch.Tensor, op: str) -> torch.Tensor:
    """The caller's preallocated output (checked) or a new one."""
    if out is None:
        return like.new_empty(rows, like.shape[1])
    if out.shape != (rows, like.shape[1]) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{op}: out must be [{rows}, {like.shape[1]}] {like.dtype} on {like.device}, got "
            f"{list(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    return out


def _span(idx: list[int]) -> slice | None:
    """idx as a slice when it is an ascending run (then rows can be viewed, not copied)."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return None


def _take(x_XS: torch.Tensor, idx: list[int]) -> torch.Tensor:
    sl = _span(idx)
    return (
        x_XS[sl]
        if sl is not None
        else x_XS[torch.tensor(idx, dtype=torch.long, device=x_XS.device)]
    )


def _put(out_XS: torch.Tensor, idx: list[int], rows_YS: torch.Tensor) -> None:
    if not idx:
        return
    sl = _span(idx)
    out_XS[sl if sl is not None else torch.tensor(idx, device=out_XS.device)] = rows_YS


def _put_or_add(out_XS: torch.Tensor, idx: list[int], rows_YS: torch.Tensor, add: bool) -> None:
    sl = _span(idx)
    if not add:
        _put(out_XS, idx, rows_YS)
    elif sl is not None:
        out_XS[sl].add_(rows_YS)
    else:
        idx_t = torch.tensor(idx, device=out_XS.device)
        out_XS[idx_t] = out_XS[idx_t] + rows_YS


def _p2p_issue(
    rnd: list[tuple[int, int, int]],
    rank: int,
    group: Group,
    send_rows: Callable[[list[int]], torch.Tensor],
    recv_view: Callable[[list[int]], torch.Tensor | None],
    land: Callable[[list[int], torch.Tensor], None],
    like_XS: torch.Tensor,
    ctx: tuple[str, str | None, float | None],
) -> Callable[[], None]:
    """Issue one tree round by point-to-point, one message per peer (experts sorted by id);
    return the function that waits for it and lands the staged rows.

    send_rows(experts) gives the rows to send; recv_view(experts) a contiguous view to receive
    into directly, or None to stage rows shaped like like_XS's and pass them to land(experts,
    rows) afterwards.
    """
    op, phase, timeout_s = ctx
    sends: dict[int, list[int]] = {}
    recvs: dict[int, list[int]] = {}
    for e, s, d in rnd:
        if s == rank:
            sends.setdefault(d, []).append(e)
        if d == rank:
            recvs.setdefault(s, []).append(e)
    ops: list[dist.P2POp] = []
    staged: list[tuple[list[int], torch.Tensor]] = []
    for d in sorted(sends):
        buf = send_rows(sorted(sends[d]))
        ops.append(dist.P2POp(dist.isend, as_bytes(buf), global_rank(group, d), group))
    for s in sorted(recvs):
        ex = sorted(recvs[s])
        buf = recv_view(ex)
        if buf is None:
            buf = like_XS.new_empty(len(ex), like_XS.shape[1])
            staged.append((ex, buf))
        ops.append(dist.P2POp(dist.irecv, as_bytes(buf), global_rank(group, s), group))
    if not ops:  # this rank sits the round out; nobody waits on it
        return lambda: None
    works = guarded(lambda: dist.batch_isend_irecv(ops), op, phase, group, timeout_s)

    def complete() -> None:
        wait_all(works, op, phase, group, timeout_s)
        for ex, buf in staged:
            land(ex, buf)

    return complete


def sparse_all_gather(
    owned_FS: torch.Tensor,
    placement_from: Placement,
    placement_to: Placement,
    group: Group = None,
    async_op: bool = False,
    *,
    algorithm: AlgoArg = "auto",
    out: torch.Tensor | None = None,
    phase: str | None = None,
    timeout_s: float | None = None,
    topology: Topology | None = None,
    cost_model: CostModel = DEFAULT_COST,
) -> tuple[torch.Tensor, CommStats] | SparseHandle:
    """spAG: every (e, r) in placement_to \\ placement_from receives expert e from its owner.

    Input rows follow placement_from.held(rank) (= owned(rank) when placement_from is P0); the
    output [T, S] follows placement_to.held(rank) and is written into `out` when given (a
    reusable buffer spares an allocation per call). Experts already held are copied locally.
    """
    op = "sparse_all_gather"
    rank, world = group_rank_world(group)
    check_gather(placement_from, placement_to)
    _check_input(owned_FS, placement_from, rank, world, op)
    x_FS = owned_FS.contiguous()
    row_bytes = x_FS.shape[1] * x_FS.element_size()
    row_from = {e: i for i, e in enumerate(placement_from.held(rank))}
    held_to = placement_to.held(rank)
    row_to = {e: i for i, e in enumerate(held_to)}
    out_TS = _output(out, len(held_to), x_FS, op)
    keep = [e for e in held_to if e in row_from]
    _put(out_TS, [row_to[e] for e in keep], _take(x_FS, [row_from[e] for e in keep]))
    algo = _pick(algorithm, placement_from, placement_to, row_bytes, cost_model, topology)
    ctx = (op, phase, timeout_s)

    if algo == "a2a":
        sched = direct_schedule(placement_from, placement_to)
        stats = _stats(sched, rank, row_bytes)
        if not sched:  # nothing moves anywhere: every rank skips the collective alike
            return SparseHandle(lambda: out_TS, stats) if async_op else (out_TS, stats)
        send = [row_from[e] for _, e in sorted((d, e) for e, s, d in sched[0] if s == rank)]
        dst = [row_to[e] for _, e in sorted((s, e) for e, s, d in sched[0] if d == rank)]
        span = _span(dst)  # receive in place when the incoming rows are one run of out_TS
        recv_RS = out_TS[span] if span is not None else out_TS.new_empty(len(dst), out_TS.shape[1])
        wait = _a2a(_take(x_FS, send), recv_RS, sched[0], rank, world, group, ctx)

        def finish_a2a() -> torch.Tensor:
            wait()
            if span is None:
                _put(out_TS, dst, recv_RS)
            return out_TS

        return SparseHandle(finish_a2a, stats) if async_op else (finish_a2a(), stats)

    sched = tree_schedule(placement_from, placement_to, topology)
    stats = _stats(sched, rank, row_bytes)

    def rows(ex: list[int]) -> torch.Tensor:
        return _take(out_TS, [row_to[e] for e in ex])

    def view(ex: list[int]) -> torch.Tensor | None:
        span = _span([row_to[e] for e in ex])
        return out_TS[span] if span is not None else None

    def land(ex: list[int], rows_XS: torch.Tensor) -> None:
        _put(out_TS, [row_to[e] for e in ex], rows_XS)

    # [Note: tree and async_op]
    # Round 0 only sends what owners already have, so it is issued now; a relay may forward only
    # what it has received, so later rounds run inside wait(), each after the one before. With
    # async_op the tree thus overlaps its first round only; a2a overlaps entirely.
    first = _p2p_issue(sched[0], rank, group, rows, view, land, out_TS, ctx) if sched else None

    def finish_tree() -> torch.Tensor:
        if first is not None:
            first()
        for rnd in sched[1:]:
            _p2p_issue(rnd, rank, group, rows, view, land, out_TS, ctx)()
        return out_TS

    return SparseHandle(finish_tree, stats) if async_op else (finish_tree(), stats)


def sparse_reduce_scatter(
    held_FS: torch.Tensor,
    placement_from: Placement,
    placement_to: Placement,
    group: Group = None,
    async_op: bool = False,
    *,
    algorithm: AlgoArg = "auto",
    out: torch.Tensor | None = None,
    phase: str | None = None,
    timeout_s: float | None = None,
    topology: Topology | None = None,
    cost_model: CostModel = DEFAULT_COST,
) -> tuple[torch.Tensor, CommStats] | SparseHandle:
    """spRS: each owner receives the sum of the copies of its experts over all holders.

    Input rows follow placement_from.held(rank) and are not modified; output [O, S] follows
    placement_to.owned(rank) (placement_to must be ownership only), written into `out` if given.

    # [Note: deterministic sums]
    Nothing is reduced inside a collective. a2a sums each expert's copies in ascending holder
    rank order; tree sums in its fixed binomial order (L = owner, then holders by cyclic rank
    distance: (L0 + L1) + (L2 + L3) for 4 holders). Both are bit-reproducible run to run; they
    agree with each other exactly only where the additions are exact (e.g. integer floats).
    """
    op = "sparse_reduce_scatter"
    rank, world = group_rank_world(group)
    check_reduce(placement_from, placement_to)
    _check_input(held_FS, placement_from, rank, world, op)
    x_FS = held_FS.contiguous()
    row_bytes = x_FS.shape[1] * x_FS.element_size()
    row_from = {e: i for i, e in enumerate(placement_from.held(rank))}
    owned = placement_to.owned(rank)
    out_OS = _output(out, len(owned), x_FS, op)
    algo = _pick(algorithm, placement_from, placement_to, row_bytes, cost_model, topology)
    ctx = (op, phase, timeout_s)

    if algo == "a2a":
        sched = reverse_schedule(direct_schedule(placement_to, placement_from))
        stats = _stats(sched, rank, row_bytes)
        keys = sorted((s, e) for rnd in sched for e, s, d in rnd if d == rank)
        recv_RS = x_FS.new_empty(len(keys), x_FS.shape[1])
        wait: Callable[[], None] = lambda: None
        if sched:  # else nothing moves anywhere: every rank skips the collective alike
            send = [row_from[e] for _, e in sorted((d, e) for e, s, d in sched[0] if s == rank)]
            wait = _a2a(_take(x_FS, send), recv_RS, sched[0], rank, world, group, ctx)

        def finish_a2a() -> torch.Tensor:
            wait()
            row_recv = {k: i for i, k in enumerate(keys)}
            order = [sorted(placement_from.holders[e]) for e in owned]
            for k in range(max((len(h) for h in order), default=0)):
                # Slot k of every owned expert is its k-th holder in rank order; one gather
                # for the local rows of this slot and one for the received rows.
                for local, rows_XS in ((True, x_FS), (False, recv_RS)):
                    pick = [
                        (o, row_from[owned[o]] if local else row_recv[(hs[k], owned[o])])
                        for o, hs in enumerate(order)
                        if k < len(hs) and (hs[k] == rank) == local
                    ]
                    if pick:
                        vals = _take(rows_XS, [p[1] for p in pick])
                        _put_or_add(out_OS, [p[0] for p in pick], vals, add=k > 0)
            return out_OS

        return SparseHandle(finish_a2a, stats) if async_op else (finish_a2a(), stats)

    sched = reverse_schedule(tree_schedule(placement_to, placement_from, topology))
    stats = _stats(sched, rank, row_bytes)
    # Partial sums live in out_OS (owned experts) or acc_AS (experts this rank relays); a
    # partial starts as own copy + first received row, so nothing is cloned up front, and the
    # caller's tensor is never written.
    owned_row = {e: i for i, e in enumerate(owned)}
    relay = sorted({e for rnd in sched for e, _, d in rnd if d == rank} - set(owned))
    relay_row = {e: i for i, e in enumerate(relay)}
    acc_AS = x_FS.new_empty(len(relay), x_FS.shape[1])
    started: set[int] = set()

    def partial(e: int) -> torch.Tensor:
        return out_OS[owned_row[e]] if e in owned_row else acc_AS[relay_row[e]]

    def rows(ex: list[int]) -> torch.Tensor:
        if not started.intersection(ex):
            return _take(x_FS, [row_from[e] for e in ex])
        return torch.stack([partial(e) if e in started else x_FS[row_from[e]] for e in ex])

    def land(ex: list[int], rows_XS: torch.Tensor) -> None:
        for i, e in enumerate(ex):
            if e in started:
                partial(e).add_(rows_XS[i])
            else:
                torch.add(x_FS[row_from[e]], rows_XS[i], out=partial(e))
                started.add(e)

    def no_view(ex: list[int]) -> None:
        return None  # partial sums are added, never received in place

    first = _p2p_issue(sched[0], rank, group, rows, no_view, land, x_FS, ctx) if sched else None

    def finish_tree() -> torch.Tensor:  # see [Note: tree and async_op]
        if first is not None:
            first()
        for rnd in sched[1:]:
            _p2p_issue(rnd, rank, group, rows, no_view, land, x_FS, ctx)()
        alone = [e for e in owned if e not in started]  # no other holder sent anything
        _put(out_OS, [owned_row[e] for e in alone], _take(x_FS, [row_from[e] for e in alone]))
        return out_OS

    return SparseHandle(finish_tree, stats) if async_op else (finish_tree(), stats)
