"""Predicted placement (before routing) from estimated loads, for one or many banks at once.

Legend: B banks, W ranks, E experts, N nodes of R ranks, t overlap degree, m memory cap,
w_BE integer load weights, c_BE copies (holders) per expert, X new copies, S slots.
Integer tensor code (loads are scaled to integers first); ties break by expert id, then rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collectives.placement import Placement, Topology, merge_pairs

I64 = torch.int64
SCALE = 1024  # estimated loads are means: 1/1024 of a row is plenty

# [Note: proportional slots, nodes first]
# With t > m the free slots (W m less the replicas already held) go to the top-t experts in
# proportion to load, D'Hondt style: copies c_e = clamp(floor(w_e / d), holders, W), the
# divisor d = (load of the k heaviest) / (slots + their holders) for the largest k whose k-th
# expert still earns its holders (one sort and prefix sums); the slots left (or over) are
# corrected in two rounds, one each to the experts with the largest load per copy
# w_e / (c_e + 1) (or taken from the smallest w_e / c_e). The new copies of all experts,
# largest load per copy first (ties: expert id), are dealt round-robin over the nodes ordered
# by planned load (the even split, sum of w_e / c_e of what they hold), an expert skipping its
# owner's node while it has fewer copies than there are nodes (nodes that lack it first; at
# most one copy per rank), so tokens find a copy in their node and no node collects the
# copies of its owners' experts. Inside a node, copies (same order) take the node's free slots
# round by round (round j: the ranks with a j-th free slot, least planned load first, the
# planned load updated after each round; ties: rank id), one copy per rank per round (at most
# m rounds); a copy whose rank already holds its expert, and copies beyond the node's slots,
# are dropped. Whatever slots are still free then take, per rank, the experts it lacks with
# the largest w_e / (c_e + 1) (one pass). Experts with zero estimated load are never
# replicated.


def excl_cumsum(x: Tensor, dim: int) -> Tensor:
    """Exclusive prefix sum along `dim` (the first entry is 0)."""
    return x.cumsum(dim) - x


def _top_mask(w_BE: Tensor, t: int) -> Tensor:
    """The t heaviest experts (ties: id) that carry any load."""
    B, E = w_BE.shape
    order = torch.argsort(-w_BE, dim=1, stable=True)
    top = torch.zeros_like(w_BE, dtype=torch.bool)
    top.scatter_(1, order[:, :t], True)
    return top & (w_BE > 0)


def _dhondt(w_BE: Tensor, h_BE: Tensor, top_BE: Tensor, slots_B: Tensor, W: int) -> Tensor:
    """Copies per expert (holders included) per [Note: proportional slots, nodes first]."""
    w = w_BE * top_BE
    cap = torch.where(top_BE, W, h_BE)
    seats_B = torch.minimum(slots_B, (cap - h_BE).sum(1))
    # the divisor d: the k heaviest experts share the seats and their holders, k the most for
    # which the k-th still earns its holders (w >= h d); prefix sums over the sorted loads
    order = torch.argsort(-w, dim=1, stable=True)
    w_s, h_s = w.gather(1, order), h_BE.gather(1, order)
    d_k = w_s.cumsum(1) / (seats_B[:, None] + h_s.cumsum(1)).to(torch.float64)
    k = ((w_s >= h_s * d_k) & (w_s > 0)).sum(1).clamp(min=1)
    d = d_k.gather(1, (k - 1)[:, None]).clamp(min=1e-9)
    c = torch.minimum(torch.maximum((w / d).floor().to(I64), h_BE), cap)
    for _ in range(2):  # two correction rounds (the Note), at most one copy per expert each
        r_B = seats_B - (c - h_BE).sum(1)
        grow = torch.where(c < cap, w / (c + 1).to(torch.float64), -1.0)
        shrink = torch.where(c > h_BE, -(w / c.to(torch.float64)), -float("inf"))
        pos_g = torch.argsort(torch.argsort(-grow, dim=1, stable=True), dim=1)
        pos_s = torch.argsort(torch.argsort(-shrink, dim=1, stable=True), dim=1)
        up = (pos_g < r_B[:, None]) & (grow >= 0)
        down = (pos_s < -r_B[:, None]) & (c > h_BE)
        c = c + up.to(I64) - down.to(I64)
    return c


def _node_deal(
    x_BE: Tensor, owner_BE: Tensor, share_BE: Tensor, planned_BW: Tensor, N: int, R: int
) -> Tensor:
    """[B, E, N] new copies per node ([Note: proportional slots, nodes first]): the copies of
    all experts, largest share first, dealt round-robin over the nodes by planned load, each
    expert's owner node skipped while it has fewer copies than nodes."""
    by_share = torch.argsort(-share_BE, dim=1, stable=True)
    start = torch.empty_like(x_BE).scatter_(1, by_share, excl_cumsum(x_BE.gather(1, by_share), 1))
    node_load = planned_BW.view(-1, N, R).sum(2)
    places = torch.arange(N, device=x_BE.device).expand_as(node_load)
    q_BN = torch.empty_like(node_load).scatter_(  # each node's place, least loaded first
        1, torch.argsort(node_load, dim=1, stable=True), places
    )
    x = x_BE[..., None]
    pos = (q_BN[:, None, :] - start[..., None]) % N  # [B, E, N]
    n = torch.where(x > pos, (x - 1 - pos) // N + 1, 0)
    own = torch.arange(N, device=x_BE.device) == (owner_BE // R)[..., None]
    move = (own & (n > 0) & (x < N)).any(2, keepdim=True)  # owner's node had one: to the next
    n = n - (own & move).to(I64) + ((pos == x) & move).to(I64)
    return torch.minimum(n, R - own.to(I64))


def _everywhere(w_BE: Tensor, top_BE: Tensor, held_BEW: Tensor, free_BW: Tensor) -> Tensor:
    """t <= m: each rank takes the top-t experts it lacks, heaviest first, while it has room."""
    order = torch.argsort(-w_BE, dim=1, stable=True)
    idx = order[..., None].expand_as(held_BEW)
    lacks = (top_BE[..., None] & ~held_BEW).gather(1, idx)
    take = lacks & (lacks.to(I64).cumsum(1) <= free_BW[:, None, :])
    return torch.zeros_like(take).scatter_(1, idx, take)


def _deal(
    w_BE: Tensor, top_BE: Tensor, held_BEW: Tensor, free_BW: Tensor, owner_BE: Tensor, R: int
) -> Tensor:
    """t > m: [Note: proportional slots, nodes first]; the new pairs as a [B, E, W] mask."""
    B, E, W = held_BEW.shape
    N, J = W // R, int(free_BW.max())
    dev = w_BE.device
    if J == 0:
        return torch.zeros_like(held_BEW)
    h_BE = held_BEW.sum(2)
    c_BE = _dhondt(w_BE, h_BE, top_BE, free_BW.sum(1), W)
    share_BE = w_BE // c_BE.clamp(min=1)
    planned_BW = (held_BEW * share_BE[..., None]).sum(1)
    n_BEN = _node_deal((c_BE - h_BE) * top_BE, owner_BE, share_BE, planned_BW, N, R)
    by_share = torch.argsort(-share_BE, dim=1, stable=True)  # copies' order inside a node
    idx = by_share[..., None].expand_as(n_BEN)
    start_BEN = torch.zeros_like(n_BEN).scatter_(1, idx, excl_cumsum(n_BEN.gather(1, idx), 1))
    n_flat = n_BEN.reshape(-1)
    block = torch.repeat_interleave(torch.arange(n_flat.numel(), device=dev), n_flat)
    at = start_BEN.reshape(-1)[block] + torch.arange(block.numel(), device=dev) - excl_cumsum(
        n_flat, 0
    )[block]  # the copy's place among its node's copies
    b, rest = block // (E * N), block % (E * N)
    e, k = rest // N, rest % N
    share = share_BE[b, e]
    add = torch.zeros_like(held_BEW)
    node = torch.arange(W, device=dev) // R
    first = torch.zeros(B, N, dtype=I64, device=dev)  # copies of each node placed so far
    for j in range(J):  # one round per free slot (J <= m): LPT over the node's open ranks
        open_BW = free_BW > j
        order = torch.argsort(node * (1 << 50) + (~open_BW) * (1 << 49) + planned_BW, dim=1,
                              stable=True)
        K_BN = open_BW.view(B, N, R).sum(2)
        t = at - first[b, k]
        now = (t >= 0) & (t < K_BN[b, k])
        r = order[b, (k * R + t.clamp(0, R - 1))]
        ok = now & ~(held_BEW | add)[b, e, r]
        add[b[ok], e[ok], r[ok]] = True
        planned_BW.view(-1).index_add_(0, (b * W + r)[ok], share[ok])
        first += K_BN
    return add | _fill_left(w_BE, top_BE, held_BEW | add, free_BW - add.sum(1), J)


def _fill_left(
    w_BE: Tensor, top_BE: Tensor, held_BEW: Tensor, left_BW: Tensor, J: int
) -> Tensor:
    """Slots still free take, per rank, the experts it lacks with the largest w / (c + 1)
    (ties: expert id)."""
    out = torch.zeros_like(held_BEW)
    b, w = torch.nonzero(left_BW > 0, as_tuple=True)
    if b.numel() == 0:
        return out
    prio_BE = w_BE / (held_BEW.sum(2) + 1).to(torch.float64)
    score_LE = torch.where(top_BE[b] & ~held_BEW[b, :, w], prio_BE[b], -1.0)
    k = min(J, score_LE.shape[1])
    pick_LK = torch.argsort(-score_LE, dim=1, stable=True)[:, :k]
    ok_LK = (score_LE.gather(1, pick_LK) >= 0) & (
        torch.arange(k, device=b.device) < left_BW[b, w][:, None]
    )
    li, ki = torch.nonzero(ok_LK, as_tuple=True)
    out[b[li], pick_LK[li, ki], w[li]] = True
    return out


def plan_placement_banks(
    loads_BE: Tensor, ownerships: list[Placement], topology: Topology, t: int, m: int
) -> list[Placement]:
    """Predicted placement of every bank (same E and W) in one go; see plan_placement."""
    B = len(ownerships)
    if B == 0:
        return []
    E, W = ownerships[0].num_experts, ownerships[0].world_size
    t = min(max(t, 0), E)
    m = min(max(m, 0), t)
    if t == 0 or m == 0:
        return list(ownerships)
    dev = loads_BE.device
    owns = [o.to(dev) for o in ownerships]
    w_BE = (loads_BE.to(torch.float64) * SCALE).round().to(I64).clamp(min=0)
    top_BE = _top_mask(w_BE, t)
    held_BEW = torch.stack([o.holders_EW() for o in owns])
    free_BW = (m - torch.stack([o.replicas_W() for o in owns])).clamp(min=0)
    if t <= m:
        add = _everywhere(w_BE, top_BE, held_BEW, free_BW)
    else:
        owner_BE = torch.stack([o.owner_E for o in owns])
        add = _deal(w_BE, top_BE, held_BEW, free_BW, owner_BE, topology.ranks_per_node)
    out = []
    for b, o in enumerate(owns):
        e, r = torch.nonzero(add[b], as_tuple=True)
        pe, pr = o.pairs_P()
        pe, pr = merge_pairs(pe, pr, e, r, W)
        out.append(Placement._trusted(o.owner_E, pe, pr, W))
    return out
