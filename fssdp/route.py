"""Where each (token, expert) row of one bank call is computed: EP's static route.

Legend: W ranks, E experts of the bank, N rows this rank routes into the bank, M rows it
receives, K experts this rank owns.

A *route* answers, for the token all-to-all, what `fssdp.assign.Assignment` answers under
FSSDP: `send_order(expert_N, src)` (the permutation of src's rows, grouped by destination rank,
then expert, then original order, and the rows per destination), `recv_counts(dst)` and
`received_experts(dst)` (the expert of every received row, by source rank then expert). Under EP
every row goes to its expert's owner, so the route follows from the count matrix alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticRoute:
    """Every row goes to the owner of its expert (EP). Built per bank call from counts_WE."""

    def __init__(self, counts_WE: Tensor, owner_E: Tensor) -> None:
        self.counts_WE = counts_WE
        self.owner_E = owner_E.to(counts_WE.device)
        self.world_size, self.num_experts = counts_WE.shape

    def send_counts(self, src: int) -> list[int]:
        out_W = torch.zeros(self.world_size, dtype=torch.int64, device=self.counts_WE.device)
        out_W.scatter_add_(0, self.owner_E, self.counts_WE[src])
        return out_W.tolist()

    def recv_counts(self, dst: int) -> list[int]:
        mine_E = self.owner_E == dst
        return (self.counts_WE * mine_E).sum(1).tolist()

    def send_order(self, expert_N: Tensor, src: int) -> tuple[Tensor, list[int]]:
        key_N = self.owner_E.to(expert_N.device)[expert_N] * self.num_experts + expert_N
        return torch.argsort(key_N, stable=True), self.send_counts(src)

    def received_experts(self, dst: int) -> Tensor:
        owned_O = torch.nonzero(self.owner_E == dst).flatten()
        per_src_WO = self.counts_WE.index_select(1, owned_O)
        return owned_O.repeat(self.world_size).repeat_interleave(per_src_WO.flatten())
