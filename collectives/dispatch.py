"""Token dispatch / combine: an uneven all-to-all of rows with autograd, and count exchanges.

Legend: N rows sent by this rank, M rows received, D row width (trailing dims flattened),
W ranks, E experts. Rows bound for rank j are contiguous in x and ordered by j.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from collectives.comm import (
    Call,
    as_bytes,
    backend_device,
    blocking,
    group_rank_world,
    guarded,
)

Group = dist.ProcessGroup | None


def _exchange(
    x_ND: torch.Tensor,
    send: list[int],
    recv: list[int],
    group: Group,
    phase: str | None,
    timeout_s: float | None,
) -> torch.Tensor:
    op = "all_to_all_rows"
    rank, world = group_rank_world(group)
    if len(send) != world or len(recv) != world:
        raise ValueError(f"{op}: need {world} send and recv counts, got {len(send)}, {len(recv)}")
    if sum(send) != x_ND.shape[0]:
        raise ValueError(f"{op}: send counts sum to {sum(send)} but x has {x_ND.shape[0]} rows")
    if world == 1:
        return x_ND.clone()
    x_ND = x_ND.contiguous()
    out_MD = torch.empty((sum(recv), *x_ND.shape[1:]), dtype=x_ND.dtype, device=x_ND.device)
    # Raw bytes: every dtype on every backend (see [Note: raw bytes on the wire] in comm.py).
    D = math.prod(x_ND.shape[1:])  # explicit: reshape(0, -1) is ambiguous for empty tensors
    src_NB, dst_MB = as_bytes(x_ND.reshape(len(x_ND), D)), as_bytes(out_MD.reshape(len(out_MD), D))
    blocking(
        lambda: dist.all_to_all_single(dst_MB, src_NB, recv, send, group=group, async_op=True),
        op,
        phase,
        group,
        timeout_s,
    )
    return out_MD


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_ND: torch.Tensor,
        send: list[int],
        recv: list[int],
        group: Group,
        phase: str | None,
        timeout_s: float | None,
    ) -> torch.Tensor:
        ctx.args = (send, recv, group, phase, timeout_s)
        return _exchange(x_ND, send, recv, group, phase, timeout_s)

    @staticmethod
    def backward(ctx: Any, grad_MD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        send, recv, group, phase, timeout_s = ctx.args
        bwd_phase = f"{phase}/backward" if phase else "backward"
        # The gradient of an exchange is the reverse exchange: rows go back where they came from.
        grad_ND = _exchange(grad_MD, recv, send, group, bwd_phase, timeout_s)
        return grad_ND, None, None, None, None, None


def all_to_all_rows(
    x_ND: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: Group = None,
    *,
    phase: str | None = None,
    timeout_s: float | None = None,
) -> torch.Tensor:
    """Send rows x_ND[sum(send[:j]) : sum(send[:j+1])] to rank j; return the [M, ...] rows
    received, ordered by source rank. Differentiable (backward = the reverse exchange)."""
    return _AllToAllRows.apply(x_ND, list(send_counts), list(recv_counts), group, phase, timeout_s)


def exchange_counts(
    send_counts: Sequence[int],
    group: Group = None,
    *,
    device: torch.device | None = None,
    phase: str | None = None,
    timeout_s: float | None = None,
) -> list[int]:
    """recv_counts[j] = the send_counts[rank] of rank j (one all_to_all_single of W int64)."""
    _, world = group_rank_world(group)
    if len(send_counts) != world:
        raise ValueError(f"exchange_counts: need {world} counts, got {len(send_counts)}")
    if world == 1:
        return list(send_counts)
    dev = device or backend_device(group)
    send_W = torch.tensor(list(send_counts), dtype=torch.int64, device=dev)
    recv_W = torch.empty_like(send_W)
    blocking(
        lambda: dist.all_to_all_single(recv_W, send_W, group=group, async_op=True),
        "exchange_counts",
        phase,
        group,
        timeout_s,
    )
    return recv_W.tolist()


class PendingCounts:
    """A count all-gather in flight (`issue_all_gather_counts`): `wait()` gives the [W, E]
    matrix; waiting twice is free."""

    def __init__(self, out_WE: torch.Tensor, work: dist.Work | None, call: Call) -> None:
        self.out_WE = out_WE
        self.work = work  # None once waited (or at world 1)
        self.call = call  # what a timeout names

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.call.wait([self.work])
            self.work = None
        return self.out_WE


def issue_all_gather_counts(
    counts_E: torch.Tensor | Sequence[int],
    group: Group = None,
    *,
    device: torch.device | None = None,
    phase: str | None = None,
    timeout_s: float | None = None,
) -> PendingCounts:
    """Start the all-gather of every rank's per-expert counts (async); every rank of the group
    must issue it at the same point of its sequence of collectives on `group`."""
    call = Call.of(group, "all_gather_counts", phase, timeout_s)
    dev = device or backend_device(group)
    c_E = torch.as_tensor(counts_E, dtype=torch.int64).to(dev).reshape(-1)
    if call.world == 1:
        return PendingCounts(c_E[None].clone(), None, call)
    out_WE = torch.empty(call.world * c_E.numel(), dtype=torch.int64, device=dev)
    work = guarded(
        lambda: dist.all_gather_single(out_WE, c_E, group=group, async_op=True),
        call.op,
        phase,
        group,
        timeout_s,
    )
    return PendingCounts(out_WE.view(call.world, c_E.numel()), work, call)


def all_gather_counts(
    counts_E: torch.Tensor | Sequence[int],
    group: Group = None,
    *,
    device: torch.device | None = None,
    phase: str | None = None,
    timeout_s: float | None = None,
) -> torch.Tensor:
    """[W, E] int64 matrix of every rank's per-expert counts, on the communication device."""
    return issue_all_gather_counts(
        counts_E, group, device=device, phase=phase, timeout_s=timeout_s
    ).wait()
