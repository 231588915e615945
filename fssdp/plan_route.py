"""TEMPORARY adapter: the nested-list plan of today's `fssdp.assign.assign_tokens` as a Route
(fssdp/dispatch.py). Removed once `assign_tokens` returns the vectorised `Assignment`."""

from __future__ import annotations

import torch
from torch import Tensor


class PlanRoute:
    def __init__(self, plan: list[list[list[tuple[int, int]]]], world: int) -> None:
        self.plan, self.world = plan, world

    def send_order(self, expert_N: Tensor, src: int) -> tuple[Tensor, list[int]]:
        return _send_order(expert_N, self.plan[src], self.world)

    def recv_counts(self, dst: int) -> list[int]:
        return _received(self.plan, dst, self.world)[1]

    def received_experts(self, dst: int) -> Tensor:
        return torch.tensor(_received(self.plan, dst, self.world)[0], dtype=torch.long)


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
