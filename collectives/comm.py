"""Shared plumbing: group queries, byte accounting, the two ways a sparse collective moves rows
(one uneven all_to_all_single, or a round of point-to-point messages), and waits that fail with a
useful message.

Legend: W ranks in the group; `work` is a torch.distributed Work handle; X rows sent, R received.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
Group = dist.ProcessGroup | None


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, the op and the phase."""


@dataclass(frozen=True)
class CommStats:
    """Payload bytes this rank sent and received in one call (headers, padding not counted)."""

    bytes_sent: int = 0
    bytes_recv: int = 0

    def __add__(self, other: CommStats) -> CommStats:
        return CommStats(self.bytes_sent + other.bytes_sent, self.bytes_recv + other.bytes_recv)


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def backend_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where small helper tensors (counts, timings) must live for the group's backend."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """Raw-byte view of a contiguous 2-D tensor: [n, S] -> [n, S * itemsize] uint8.

    # [Note: raw bytes on the wire]
    Transfers in this package never reduce inside the collective (sums are done locally, in a
    fixed order), so they can move uint8 views: every dtype works on every backend (gloo lacks
    some), and byte counts are exact by construction.
    """
    if not x.is_contiguous():  # a copy would silently swallow received bytes
        raise ValueError("as_bytes needs a contiguous tensor")
    return x.view(torch.uint8)


def _timeout_s(group: dist.ProcessGroup | None, timeout_s: float | None) -> float | None:
    if timeout_s is not None:
        return timeout_s
    try:  # best effort: the process group's own timeout, only for the message
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - backend without options; the message says so
        return None


def _error(
    op: str,
    phase: str | None,
    group: dist.ProcessGroup | None,
    timeout_s: float | None,
    err: Exception,
) -> CollectiveError:
    rank = dist.get_rank() if dist.is_initialized() else 0
    where = f"(phase {phase})" if phase else "(no phase given)"
    text = str(err)
    if "timed out" in text.lower() or "timeout" in text.lower():
        t = _timeout_s(group, timeout_s)
        after = f"after {t:g}s " if t is not None else ""
        return CollectiveError(f"rank {rank}: {op} timed out {after}{where}: {text}")
    return CollectiveError(f"rank {rank}: {op} failed {where}: {type(err).__name__}: {text}")


def guarded(
    fn: Callable[[], T],
    op: str,
    phase: str | None,
    group: dist.ProcessGroup | None = None,
    timeout_s: float | None = None,
) -> T:
    """Run `fn` (an issue or a wait); turn backend errors into CollectiveError."""
    try:
        return fn()
    except CollectiveError:
        raise
    except RuntimeError as err:  # gloo/NCCL errors and timeouts are RuntimeError subclasses
        raise _error(op, phase, group, timeout_s, err) from err


def wait_all(
    works: Sequence[dist.Work | None],
    op: str,
    phase: str | None,
    group: dist.ProcessGroup | None = None,
    timeout_s: float | None = None,
) -> None:
    """Wait on every work; a timeout or backend error raises CollectiveError."""

    def _wait() -> None:
        for w in works:
            if w is None:
                continue
            if timeout_s is None:
                w.wait()
            else:
                w.wait(timeout=timedelta(seconds=timeout_s))

    guarded(_wait, op, phase, group, timeout_s)


def blocking(
    issue: Callable[[], dist.Work | None],
    op: str,
    phase: str | None,
    group: dist.ProcessGroup | None = None,
    timeout_s: float | None = None,
) -> None:
    """Issue one async collective (`issue()` returns its work) and wait for it, both guarded."""
    wait_all([guarded(issue, op, phase, group, timeout_s)], op, phase, group, timeout_s)


@dataclass(frozen=True)
class Call:
    """One collective call's context: this rank, the group, and what errors name."""

    rank: int
    world: int
    group: Group
    op: str
    phase: str | None
    timeout_s: float | None

    @staticmethod
    def of(group: Group, op: str, phase: str | None, timeout_s: float | None) -> Call:
        rank, world = group_rank_world(group)
        return Call(rank, world, group, op, phase, timeout_s)

    def wait(self, works: Sequence[dist.Work | None]) -> None:
        wait_all(works, self.op, self.phase, self.group, self.timeout_s)


def issue_a2a(
    call: Call,
    send_XS: torch.Tensor,
    recv_RS: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
) -> dist.Work | None:
    """Issue one uneven all_to_all_single of raw rows (async); every rank of the group joins.

    send_XS holds the rows for rank 0 first, then rank 1, ...; recv_RS (contiguous) gets the
    rows from rank 0 first. Counts are in rows.
    """
    send_XB, recv_RB = as_bytes(send_XS), as_bytes(recv_RS)

    def issue() -> dist.Work | None:
        return dist.all_to_all_single(
            recv_RB, send_XB, recv_counts, send_counts, call.group, async_op=True
        )

    return guarded(issue, call.op, call.phase, call.group, call.timeout_s)


def issue_p2p(
    call: Call,
    sends: Sequence[tuple[int, torch.Tensor]],
    recvs: Sequence[tuple[int, torch.Tensor]],
) -> list[dist.Work]:
    """Issue one round of point-to-point messages, (group peer, contiguous rows) each, as one
    batch_isend_irecv; sends first, in the order given. [] when this rank sits the round out
    (nobody waits on it)."""
    ops = [
        dist.P2POp(dist.isend, as_bytes(buf), global_rank(call.group, peer), call.group)
        for peer, buf in sends
    ] + [
        dist.P2POp(dist.irecv, as_bytes(buf), global_rank(call.group, peer), call.group)
        for peer, buf in recvs
    ]
    if not ops:
        return []
    return guarded(
        lambda: dist.batch_isend_irecv(ops), call.op, call.phase, call.group, call.timeout_s
    )
