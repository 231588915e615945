"""Predicted placement (before routing) from estimated loads, for one or many banks at once.

Legend: B banks, W ranks, E experts, N nodes of R ranks, t overlap degree, m memory cap,
w_BE integer load weights, c_BE copies (holders) per expert, X new copies, S slots.
Integer tensor code (loads are scaled to integers first); ties break by expert id, then rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collectives.placement import Placement, Topology, merge_pairs
from fssdp.segments import excl_cumsum

I64 = torch.int64
SCALE = 1024  # estimated loads are means: 1/1024 of a row is plenty

# [Note: proportional slots, nodes first]
# With t > m the free slots (W m less the replicas already held) go to the top-t experts in
# proportion to load, D'Hondt style: copies c_e = clamp(floor(w_e C / D), holders, W) for
# C = slots + holders, D = total load, then the slots left (or over) are corrected in two
# rounds, one each to the experts with the largest load per copy w_e / (c_e + 1) (or taken from
# the smallest w_e / c_e). Each expert's new copies are dealt to nodes round-robin starting at
# the node after its owner's (nodes that lack it first, its own node last, at most one copy per
# rank), so tokens find a copy in their node. Inside a node, copies (largest load per copy
# first, ties: expert id) take the node's free slots in order: slot round j (a rank's j-th free
# slot), then least planned load (the even split, sum of w_e / c_e), most free slots, lowest
# id; a copy whose slot is already its expert's (the owner, or a second copy of it) and copies
# beyond the node's slots are dropped. Whatever slots are still free then take, per rank, the
# experts it lacks with the largest w_e / (c_e + 1) (one pass). Experts with zero estimated load
# are never replicated.


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
    C = seats_B + (h_BE * top_BE).sum(1)
    D = w.sum(1).clamp(min=1)
    c = torch.minimum(torch.maximum(w * C[:, None] // D[:, None], h_BE), cap)
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


def _node_deal(x_BE: Tensor, owner_BE: Tensor, top_BE: Tensor, N: int, R: int) -> Tensor:
    """[B, E, N] new copies per node: round-robin from the node after the owner's."""
    k = torch.arange(N, device=x_BE.device)
    n0 = (owner_BE // R)[..., None]
    pos = (k - n0 - 1) % N
    n = torch.where(x_BE[..., None] > pos, (x_BE[..., None] - 1 - pos) // N + 1, 0)
    return torch.minimum(n, R - (pos == N - 1).to(I64)) * top_BE[..., None]


def _everywhere(w_BE: Tensor, top_BE: Tensor, held_BEW: Tensor, free_BW: Tensor) -> Tensor:
    """t <= m: each rank takes the top-t experts it lacks, heaviest first, while it has room."""
    order = torch.argsort(-w_BE, dim=1, stable=True)
    idx = order[..., None].expand_as(held_BEW)
    lacks = (top_BE[..., None] & ~held_BEW).gather(1, idx)
    take = lacks & (lacks.to(I64).cumsum(1) <= free_BW[:, None, :])
    return torch.zeros_like(take).scatter_(1, idx, take)


def _slot_list(planned_BW: Tensor, free_BW: Tensor, R: int, J: int) -> tuple[Tensor, Tensor]:
    """Every free slot (rank, round j) in node, j, planned-load order: (rank per slot [B, W*J],
    first slot of each node [B, N+1])."""
    B, W = free_BW.shape
    dev = free_BW.device
    by_load = torch.argsort(planned_BW * (J + 1) + (J - free_BW), dim=1, stable=True)
    pos = torch.empty_like(by_load).scatter_(1, by_load, torch.arange(W, device=dev).expand(B, W))
    node = torch.arange(W, device=dev) // R
    j = torch.arange(J, device=dev)
    key = (node[:, None] * J + j) * W + pos[..., None]  # [B, W, J]
    key = torch.where(j < free_BW[..., None], key, W * J * W + key)
    slots = torch.argsort(key.reshape(B, W * J), dim=1) // J
    per_node = free_BW.view(B, W // R, R).sum(2)
    return slots, torch.nn.functional.pad(per_node.cumsum(1), (1, 0))


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
    n_BEN = _node_deal(c_BE - h_BE, owner_BE, top_BE, N, R)
    planned_BW = (held_BEW * share_BE[..., None]).sum(1)
    slots, node_first = _slot_list(planned_BW, free_BW, R, J)
    by_share = torch.argsort(-share_BE, dim=1, stable=True)  # copies' order inside a node
    idx = by_share[..., None].expand_as(n_BEN)
    start_BEN = torch.zeros_like(n_BEN).scatter_(1, idx, excl_cumsum(n_BEN.gather(1, idx), 1))
    n_flat = n_BEN.reshape(-1)
    block = torch.repeat_interleave(torch.arange(n_flat.numel(), device=dev), n_flat)
    i = torch.arange(block.numel(), device=dev) - excl_cumsum(n_flat)[block]
    b, rest = block // (E * N), block % (E * N)
    e, k = rest // N, rest % N
    at = node_first[b, k] + start_BEN.reshape(-1)[block] + i
    fits = at < node_first[b, k + 1]
    r = slots[b, at.clamp(max=W * J - 1)]
    ok = fits & ~held_BEW[b, e, r]
    add = torch.zeros_like(held_BEW)
    add[b[ok], e[ok], r[ok]] = True
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
