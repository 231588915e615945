"""One bank call across ranks: rows out by all-to-all, expert compute, results back.

Shared by EP (`fssdp/ep.py`) and FSSDP (`fssdp/executor.py`); they differ only in the route
(who computes which rows) and in the weights the compute uses.

Legend: N rows this rank sends into the bank, M rows it computes, D row width, O output width,
W ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from collectives.dispatch import all_to_all_rows
from fssdp.phases import PhaseTimer, time_backward_chain


class Route(Protocol):
    """Who computes which rows (fssdp.assign.Assignment under FSSDP, StaticRoute under EP)."""

    def send_order(self, expert_N: Tensor, src: int) -> tuple[Tensor, list[int]]: ...

    def recv_counts(self, dst: int) -> list[int]: ...

    def received_experts(self, dst: int) -> Tensor: ...


# compute(x_MD, expert_M) -> y_MO: the expert math on the rows this rank received (global ids).
Compute = Callable[[Tensor, Tensor], Tensor]


@dataclass
class CallStats:
    """What the bank calls of one step did on this rank (summed over calls)."""

    rows_computed: int = 0
    expert_time_s: float = 0.0
    bytes: dict[str, int] = field(default_factory=lambda: {"spag": 0, "sprs": 0, "a2a": 0})


class Tie(torch.autograd.Function):
    """Pass `y` through and give each of `others` a zero gradient.

    A rank that computes no rows gets `y` from a fresh zero tensor, disconnected from the rows
    it received (and, under FSSDP, from its replicas). Its autograd would then skip the dispatch
    all-to-all's backward (and the replicas' accumulation, which starts the reduce) while the
    other ranks wait in those collectives: a hang (seen for real under skewed routing). Tying
    `y` to them keeps every rank's backward issuing the same collectives.
    """

    @staticmethod
    def forward(ctx, y: Tensor, *others: Tensor) -> Tensor:  # noqa: ANN001
        ctx.shapes = [o.shape for o in others]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
        return (grad_y, *(grad_y.new_zeros(shape) for shape in ctx.shapes))


@dataclass
class Exchange:
    """The collective context of a bank's calls: group, rank, timeout, timer, counters."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    timeout_s: float
    name: str  # the bank's name, for phases in error messages
    phases: PhaseTimer
    stats: CallStats


def exchange_compute(
    ex: Exchange,
    x_ND: Tensor,
    expert_N: Tensor,
    route: Route,
    compute: Compute,
    recompute: bool = False,
    before_compute: Callable[[], None] | None = None,
) -> Tensor:
    """y_NO for the rows x_ND of experts expert_N, computed where `route` says. `recompute`:
    activation checkpointing's second forward (its exchanges are counted once more, its
    backward is the first forward's). `before_compute` runs between the dispatch all-to-all
    and the expert compute, outside the expert timer (FSSDP waits for its replicas there)."""
    ph = ex.phases
    tok = ph.begin("dispatch")
    send_idx_N, send_counts = route.send_order(expert_N, ex.rank)
    recv_counts = route.recv_counts(ex.rank)
    experts_M = route.received_experts(ex.rank).to(x_ND.device)
    x_sent_ND = x_ND.index_select(0, send_idx_N)
    x_MD = all_to_all_rows(
        x_sent_ND,
        send_counts,
        recv_counts,
        ex.group,
        phase=f"dispatch {ex.name}",
        timeout_s=ex.timeout_s,
    )
    ph.end(tok)
    if before_compute is not None:
        before_compute()
    tok = ph.begin("expert")
    t0 = time.perf_counter()
    y_MO = compute(x_MD, experts_M)
    ex.stats.expert_time_s += time.perf_counter() - t0
    ph.end(tok)
    ex.stats.rows_computed += x_MD.shape[0]
    if x_MD.shape[0] == 0 and x_MD.requires_grad:
        y_MO = Tie.apply(y_MO, x_MD)
    tok = ph.begin("combine")
    y_back_NO = all_to_all_rows(
        y_MO,
        recv_counts,
        send_counts,
        ex.group,
        phase=f"combine {ex.name}",
        timeout_s=ex.timeout_s,
    )
    ph.end(tok)
    time_backward_chain(ph, [y_back_NO, y_MO, x_MD, x_sent_ND], ["combine", "expert", "dispatch"])
    _count_bytes(ex, x_ND, y_MO, send_counts, recv_counts, recompute)
    inverse_N = torch.empty_like(send_idx_N)
    inverse_N[send_idx_N] = torch.arange(send_idx_N.numel(), device=send_idx_N.device)
    return y_back_NO.index_select(0, inverse_N)


def _count_bytes(
    ex: Exchange,
    x_ND: Tensor,
    y_MO: Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    recompute: bool,
) -> None:
    sent_rows = sum(send_counts) - send_counts[ex.rank]
    back_rows = sum(recv_counts) - recv_counts[ex.rank]
    # backward repeats both exchanges (a recomputation's backward is the first forward's)
    passes = 2 if torch.is_grad_enabled() and not recompute else 1
    row = x_ND.element_size()
    ex.stats.bytes["a2a"] += passes * row * (sent_rows * x_ND.shape[1] + back_rows * y_MO.shape[1])
