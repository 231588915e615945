"""Token dispatch / combine (all_to_all_rows) and count exchanges vs a single-process reference.

Legend: W ranks, N_r rows on rank r, D row width, E experts. Every rank builds the same global
batch (seeded), takes its slice, and checks against autograd on the rank-concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from collectives import all_gather_counts, all_to_all_rows, exchange_counts
from tests.support.harness import run_distributed


def make_batch(
    W: int, case: int, dtype: torch.dtype
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(rows per rank, x [N, D], destination rank per row) of the global batch."""
    g = torch.Generator().manual_seed(100 * W + case)
    n = torch.randint(0, 7, (W,), generator=g).tolist()
    if case == 1:
        n[0] = 0  # a rank with nothing to send
    N = sum(n)
    D = 3 + case
    x = torch.randint(-5, 6, (N, D), generator=g).to(dtype)
    dest = torch.randint(0, W, (N,), generator=g)
    if case == 2 and W > 1:
        dest = dest % (W - 1)  # the last rank receives nothing
    if case == 3:
        dest = torch.zeros(N, dtype=torch.long)  # everything to rank 0
    return n, x, dest


def coefs(x: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape).to(x.dtype)


def reference(x: torch.Tensor, dest: torch.Tensor, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single process: combined output and d(loss)/dx of the round trip f(row) at its dest."""
    x = x.clone().requires_grad_()
    w = torch.arange(1, W + 1).to(x.dtype)[dest][:, None]
    z = x * x * w  # expert compute at the destination rank, which scales by (rank + 1)
    (z * coefs(x)).sum().backward()
    return z.detach(), x.grad


def check_dispatch(rank: int, W: int, case: int, dtype: torch.dtype) -> None:
    n, x_all, dest_all = make_batch(W, case, dtype)
    z_ref, grad_ref = reference(x_all, dest_all, W)
    coef_all = coefs(x_all)

    def send_order(j: int) -> torch.Tensor:
        """Global ids of rank j's rows grouped by destination (stable: row order kept)."""
        lo = sum(n[:j])
        return torch.sort(dest_all[lo : lo + n[j]], stable=True).indices + lo

    order = send_order(rank)
    x = x_all[order].clone().requires_grad_()
    send = torch.bincount(dest_all[order], minlength=W).tolist()
    recv = exchange_counts(send)
    expect_recv = [int((dest_all[send_order(j)] == rank).sum()) for j in range(W)]
    assert recv == expect_recv, (recv, expect_recv)

    y = all_to_all_rows(x, send, recv, phase="dispatch")
    # Rows arriving here: rank 0's rows bound here, then rank 1's, ..., each in send order.
    mine = torch.cat([send_order(j)[dest_all[send_order(j)] == rank] for j in range(W)])
    assert y.shape == (int(sum(recv)), x.shape[1]) and y.dtype == dtype
    assert torch.equal(y, x_all[mine]), f"case {case} {dtype}: dispatched rows differ"
    z = y * y * (rank + 1)
    back = all_to_all_rows(z, recv, send, phase="combine")
    assert back.shape == x.shape
    # Same elementwise ops on the same values as the reference: exact in every dtype.
    assert torch.equal(back, z_ref[order]), f"case {case} {dtype}: combined rows differ"
    (back * coef_all[order]).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, grad_ref[order]), f"case {case} {dtype}"


def check_counts(rank: int, W: int) -> None:
    counts_E = torch.arange(5) * (rank + 1)
    got = all_gather_counts(counts_E)
    expect = torch.stack([torch.arange(5) * (r + 1) for r in range(W)])
    assert got.dtype == torch.int64 and torch.equal(got, expect), got
    assert torch.equal(all_gather_counts([rank, 7]), torch.tensor([[r, 7] for r in range(W)]))


def worker_dispatch(rank: int, W: int) -> int:
    n = 0
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for case in range(4):
            check_dispatch(rank, W, case, dtype)
            n += 1
    check_counts(rank, W)
    return n


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_dispatch_distributed(world: int) -> None:
    assert run_distributed(worker_dispatch, world, timeout_s=90) == [12] * world


def test_world1_without_process_group() -> None:
    assert not dist.is_initialized()
    check_dispatch(0, 1, 0, torch.float64)
    check_dispatch(0, 1, 1, torch.float32)
    check_counts(0, 1)
    x = torch.zeros(0, 4, requires_grad=True)
    y = all_to_all_rows(x, [0], [0])
    assert y.shape == (0, 4)
    with pytest.raises(ValueError, match="send counts sum to 3 but x has 0 rows"):
        all_to_all_rows(x, [3], [3])
    with pytest.raises(ValueError, match="need 1 send and recv counts, got 2, 2"):
        all_to_all_rows(x, [0, 0], [0, 0])
