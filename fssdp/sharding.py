"""Ownership of experts across ranks (P0) for all expert banks jointly.

Legend: W ranks, N nodes of R ranks, b a bank (one MoE layer's experts, named by its module
path), E_b its experts, S = Σ_b E_b expert slots in all, K a batch of experts placed at once.
owner[b][e] = the rank that owns expert e of bank b: it holds the parameters, the gradient
accumulator and the only copy of the optimizer state.

All functions are pure and deterministic tensor code (loads are scaled to integers; banks are
visited in sorted-name order where order is not set by load; ties break by expert id, then rank
id), so every rank computes the same layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from collectives.placement import Topology

I64 = torch.int64
SCALE = 1 << 20  # loads are floats (estimates): scaled to integers, exact ties stay ties
BIG = 1 << 60


def slot_counts(total: int, world_size: int) -> list[int]:
    """Expert slots per rank: total // W each, the first (total mod W) ranks one more."""
    q, rem = divmod(total, world_size)
    return [q + (r < rem) for r in range(world_size)]


def contiguous_sharding(num_experts: int, world_size: int) -> list[int]:
    """EP's static layout: owner[e] = e * W // E, contiguous blocks in rank order.

    E < W is allowed: some ranks then own no expert (they still compute replicas under FSSDP).
    """
    if num_experts < 0 or world_size < 1:
        raise ValueError(
            f"contiguous_sharding: need num_experts >= 0 and world_size >= 1, "
            f"got {num_experts}, {world_size}"
        )
    return (torch.arange(num_experts) * world_size // max(num_experts, 1)).tolist()


def balanced_uniform_sharding(banks: Mapping[str, int], topology: Topology) -> dict[str, list[int]]:
    """First-step layout (no load history): every rank owns S // W or S // W + 1 experts.

    Per bank (sorted names) each rank gets E_b // W experts; the E_b mod W leftover experts go to
    the ranks with the fewest slots so far (ties: lowest rank), which keeps totals within ±1 and
    ends with the first (S mod W) ranks one up. Experts are laid out in contiguous rank blocks,
    so one bank with E divisible by W gets exactly `contiguous_sharding`. Fewest-first with ties
    to the lowest rank deals the leftovers of all banks cyclically over the ranks, so bank b's
    go to ranks (L_b + i) mod W, L_b the leftovers of the banks before it: no loop over ranks.
    """
    W = topology.world_size
    names = sorted(banks)
    sizes = torch.tensor([int(banks[n]) for n in names], dtype=I64)
    if bool((sizes < 0).any()):
        bad = names[int(torch.nonzero(sizes < 0)[0])]
        raise ValueError(f"balanced_uniform_sharding: bank {bad!r} has {banks[bad]} experts")
    q, rem = sizes // W, sizes % W
    start = rem.cumsum(0) - rem
    r = torch.arange(W)
    extra = ((r[None, :] - start[:, None]) % W < rem[:, None]).to(I64)  # [banks, W]
    per_rank = q[:, None] + extra
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out[name] = torch.repeat_interleave(r, per_rank[i]).tolist()
    return out


# [Note: heterogeneous sharding]
# Every rank gets the same number of expert slots in total (slot_counts), but a bank may put
# anywhere from 0 to E_b of its experts on one rank: slot balance is global, load balance is per
# bank. Each bank's top-t experts (t = set_aside[b], the ones planning will replicate anyway)
# are set aside. The rest are placed first, longest-processing-time style: banks in order of
# their heaviest remaining expert (ties: name), each bank's experts heaviest first (ties: id),
# each on the node with the least load, then the rank in it with the least load, among those
# with a free slot (ties: lowest id). Then the set-aside experts of all banks fill the remaining
# slots, heaviest first (ties: bank name, expert id), by the same rule. "Load" is first this
# bank's load placed on the node / rank (banks run one after another, so a rank's time in bank
# b depends on bank b's experts only), then the load of all banks placed there as the tie-break.
# Vectorised as LPT in rounds. A round of one bank takes the ranks with a free slot whose load is
# at most the least such load plus the next expert's (the ranks one-at-a-time LPT would reach
# first: a rank far above stays out until the others catch up or fill), K of them, and hands the
# next K experts out heaviest first in pick order: the best such rank of every node (nodes by
# load), then the second best of every node, ... (a round's experts spread over nodes first and
# take distinct ranks). A round of set-aside experts from several banks gives each its first
# pick and resolves clashes in expert order (the losers wait for the next round). Every round
# places at least one expert: about S / W rounds in all when loads are close, each O(K W).


def _lex_order(keys: list[Tensor]) -> Tensor:
    """Per row, the column order sorting by keys[0], then keys[1], ... (then column id)."""
    K, W = keys[0].shape
    perm = torch.arange(W).expand(K, W)
    for key in reversed(keys):
        perm = perm.gather(1, torch.argsort(key.gather(1, perm), dim=1, stable=True))
    return perm


class _SlotTable:
    """Free slots and placed load per rank (and per bank) while experts are being placed."""

    def __init__(self, banks: int, total: int, topology: Topology) -> None:
        W = topology.world_size
        self.R, self.N = topology.ranks_per_node, topology.num_nodes
        self.free = torch.tensor(slot_counts(total, W), dtype=I64)
        self.total = torch.zeros(W, dtype=I64)
        self.bank = torch.zeros(banks, W, dtype=I64)

    def pick_order(self, b_K: Tensor, avail: Tensor | None = None) -> Tensor:
        """[K, W]: ranks in pick order for an expert of bank b_K[k] ([Note: heterogeneous
        sharding]); ranks without a free slot (or outside `avail`) last."""
        R, N = self.R, self.N
        W = R * N
        K = b_K.numel()
        bank = self.bank.index_select(0, b_K)
        total = self.total.expand(K, W)
        ok = self.free > 0 if avail is None else avail
        closed = (~ok).to(I64).expand(K, W)
        node = (torch.arange(W) // R).expand(K, W)
        by_node = _lex_order([node, closed, bank, total])  # each node's ranks, best first
        within = torch.empty_like(by_node).scatter_(1, by_node, torch.arange(W).expand(K, W)) % R
        n_closed = closed.view(K, N, R).min(2).values
        n_order = _lex_order([n_closed, bank.view(K, N, R).sum(2), total.view(K, N, R).sum(2)])
        n_pos = torch.empty_like(n_order).scatter_(1, n_order, torch.arange(N).expand(K, N))
        key = (closed * R + within) * N + n_pos.repeat_interleave(R, 1)
        return torch.argsort(key, dim=1, stable=True)

    def take(self, b_K: Tensor, load_K: Tensor, ranks: Tensor) -> None:
        self.free.index_add_(0, ranks, -torch.ones_like(ranks))
        self.total.index_add_(0, ranks, load_K)
        self.bank.view(-1).index_add_(0, b_K * self.bank.shape[1] + ranks, load_K)


def _place(slots: _SlotTable, b_Q: Tensor, e_Q: Tensor, w_Q: Tensor, owner: Tensor) -> None:
    """LPT in rounds over the queue (heaviest first) of experts (b_Q, e_Q) with loads w_Q,
    writing owner[b, e] ([Note: heterogeneous sharding])."""
    while b_Q.numel():  # each round places at least one expert: about S / W rounds in all
        K = min(b_Q.numel(), int((slots.free > 0).sum()))
        b_K, e_K, w_K = b_Q[:K], e_Q[:K], w_Q[:K]
        if bool((b_K == b_K[0]).all()):  # one bank: the best picks, heaviest first
            # ranks the next expert would reach before any other: load <= least + its load
            bank, ok = slots.bank[b_K[0]], slots.free > 0
            least = torch.where(ok, bank, BIG).min()
            part = ok & (bank <= least + w_K[0])
            K = min(K, int(part.sum()))
            b_K, e_K, w_K = b_K[:K], e_K[:K], w_K[:K]
            ranks = slots.pick_order(b_K[:1], part)[0, :K]
            won = torch.ones(K, dtype=torch.bool)
        else:  # mixed banks: each its first pick, a clash goes to the earlier expert
            first = slots.pick_order(b_K)[:, 0]
            win = torch.full((slots.free.numel(),), K, dtype=I64)
            win.scatter_reduce_(0, first, torch.arange(K), reduce="amin")
            won = win.index_select(0, first) == torch.arange(K)
            ranks = first
        slots.take(b_K[won], w_K[won], ranks[won])
        owner.view(-1).index_put_((b_K[won] * owner.shape[1] + e_K[won],), ranks[won])
        keep = torch.cat([~won, torch.ones(b_Q.numel() - K, dtype=torch.bool)])
        b_Q, e_Q, w_Q = b_Q[keep], e_Q[keep], w_Q[keep]


def _as_ints(x: Any) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.tensor([float(v) for v in x], dtype=torch.float64)
    return (t.to(torch.float64).flatten() * SCALE).round().to(I64)


def heterogeneous_sharding(
    loads: Mapping[str, Sequence[float] | Any], topology: Topology, set_aside: Mapping[str, int]
) -> dict[str, list[int]]:
    """Bank name -> owner rank per expert; see [Note: heterogeneous sharding]."""
    names = sorted(loads)
    unknown = sorted(set(set_aside) - set(names))
    if unknown:
        raise ValueError(f"heterogeneous_sharding: set_aside names unknown banks {unknown}")
    for b in names:
        if int(set_aside.get(b, 0)) < 0:
            raise ValueError(
                f"heterogeneous_sharding: set_aside[{b!r}] = {set_aside[b]} must be >= 0"
            )
    vals = [_as_ints(loads[b]) for b in names]
    E_max = max((v.numel() for v in vals), default=0)
    pad = [torch.nn.functional.pad(v, (0, E_max - v.numel()), value=-1) for v in vals]
    w_BE = torch.stack(pad) if vals else torch.zeros(0, 0, dtype=I64)
    owner = torch.full_like(w_BE, -1)
    slots = _SlotTable(len(names), sum(v.numel() for v in vals), topology)
    order = torch.argsort(-w_BE, dim=1, stable=True)  # heaviest first, ties: id
    t_B = torch.tensor([min(int(set_aside.get(b, 0)), v.numel()) for b, v in zip(names, vals)],
                       dtype=I64)
    size_B = torch.tensor([v.numel() for v in vals], dtype=I64)
    col = torch.arange(E_max)
    aside = col < t_B[:, None]
    rest = (col >= t_B[:, None]) & (col < size_B[:, None])
    heavy = torch.where(rest, w_BE.gather(1, order), -1).max(1).values if E_max else size_B
    for i in sorted(range(len(names)), key=lambda i: (-int(heavy[i]), i)):
        if bool(rest[i].any()):  # banks one after another, heaviest remaining expert first
            e = order[i][rest[i]]
            _place(slots, torch.full_like(e, i), e, w_BE[i, e], owner)
    b_L, k_L = torch.nonzero(aside, as_tuple=True)
    e_L = order[b_L, k_L]
    w_L = w_BE[b_L, e_L]
    late = _lex_order([(-w_L)[None], b_L[None], e_L[None]])[0]  # heaviest, then bank, expert
    _place(slots, b_L[late], e_L[late], w_L[late], owner)
    return {b: owner[i, : vals[i].numel()].tolist() for i, b in enumerate(names)}


def sharding_changed(old: Mapping[str, Sequence[int]], new: Mapping[str, Sequence[int]]) -> bool:
    """True when any bank is added, dropped, or has an expert with a different owner."""
    if sorted(old) != sorted(new):
        return True
    return any(list(old[b]) != list(new[b]) for b in old)


def moves(old_owner: Sequence[int], new_owner: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, from_rank, to_rank) for each expert whose owner changes, by expert id."""
    if len(old_owner) != len(new_owner):
        raise ValueError(
            f"moves: old has {len(old_owner)} experts, new has {len(new_owner)}; a bank's expert "
            "count cannot change when resharding"
        )
    a, b = torch.as_tensor(list(old_owner), dtype=I64), torch.as_tensor(list(new_owner), dtype=I64)
    e = torch.nonzero(a != b).flatten()
    return list(zip(e.tolist(), a[e].tolist(), b[e].tolist()))
