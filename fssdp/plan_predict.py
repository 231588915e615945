"""Predicted placement (before routing) from estimated loads, for one or many banks at once.

Legend: B banks, W ranks, E experts, N nodes of R ranks, t overlap degree, m memory cap,
w_BE integer load weights, c_BE copies (holders) per expert, X new copies, S slots.
Integer host-array code ([Note: the control plane on the host] in fssdp/host.py; loads are
scaled to integers first); ties break by expert id, then rank.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from collectives.placement import Placement, Topology
from fssdp.host import host, host_array
from fssdp.segments import excl_cumsum

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


def _desc(x: np.ndarray) -> np.ndarray:
    """Per row: indices by x descending, ties by index (a stable sort of -x)."""
    return np.argsort(-x, axis=1, kind="stable")


def _scatter(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """out[b, order[b, i]] = values[b, i] (order a permutation of each row)."""
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=1)
    return out


def _top_mask(w_BE: np.ndarray, t: int) -> np.ndarray:
    """The t heaviest experts (ties: id) that carry any load."""
    top = np.zeros(w_BE.shape, dtype=bool)
    np.put_along_axis(top, _desc(w_BE)[:, :t], True, axis=1)
    return top & (w_BE > 0)


def _dhondt(
    w_BE: np.ndarray, h_BE: np.ndarray, top_BE: np.ndarray, slots_B: np.ndarray, W: int
) -> np.ndarray:
    """Copies per expert (holders included) per [Note: proportional slots, nodes first]."""
    w = w_BE * top_BE
    cap = np.where(top_BE, W, h_BE)
    seats_B = np.minimum(slots_B, (cap - h_BE).sum(1))
    # the divisor d: the k heaviest experts share the seats and their holders, k the most for
    # which the k-th still earns its holders (w >= h d); prefix sums over the sorted loads
    # (every expert has its owner, so the denominators are >= 1)
    order = _desc(w)
    w_s, h_s = np.take_along_axis(w, order, 1), np.take_along_axis(h_BE, order, 1)
    d_k = w_s.cumsum(1) / (seats_B[:, None] + h_s.cumsum(1)).astype(np.float64)
    k = np.maximum(((w_s >= h_s * d_k) & (w_s > 0)).sum(1), 1)
    d = np.maximum(np.take_along_axis(d_k, (k - 1)[:, None], 1), 1e-9)
    c = np.minimum(np.maximum(np.floor(w / d).astype(np.int64), h_BE), cap)
    for _ in range(2):  # two correction rounds (the Note), at most one copy per expert each
        r_B = seats_B - (c - h_BE).sum(1)
        grow = np.where(c < cap, w / (c + 1), -1.0)
        shrink = np.where(c > h_BE, -(w / np.maximum(c, 1)), -np.inf)
        pos_g = np.argsort(_desc(grow), axis=1, kind="stable")
        pos_s = np.argsort(_desc(shrink), axis=1, kind="stable")
        up = (pos_g < r_B[:, None]) & (grow >= 0)
        down = (pos_s < -r_B[:, None]) & (c > h_BE)
        c = c + up - down.astype(np.int64)
    return c


def _node_deal(
    x_BE: np.ndarray,
    owner_BE: np.ndarray,
    share_BE: np.ndarray,
    planned_BW: np.ndarray,
    N: int,
    R: int,
) -> np.ndarray:
    """[B, E, N] new copies per node ([Note: proportional slots, nodes first]): the copies of
    all experts, largest share first, dealt round-robin over the nodes by planned load, each
    expert's owner node skipped while it has fewer copies than nodes."""
    by_share = _desc(share_BE)
    start = _scatter(by_share, excl_cumsum(np.take_along_axis(x_BE, by_share, 1), axis=1))
    node_load = planned_BW.reshape(-1, N, R).sum(2)
    places = np.broadcast_to(np.arange(N), node_load.shape)
    q_BN = _scatter(np.argsort(node_load, axis=1, kind="stable"), places)  # least loaded first
    x = x_BE[..., None]
    pos = (q_BN[:, None, :] - start[..., None]) % N  # [B, E, N]
    n = np.where(x > pos, (x - 1 - pos) // N + 1, 0)
    own = np.arange(N) == (owner_BE // R)[..., None]
    move = (own & (n > 0) & (x < N)).any(2, keepdims=True)  # owner's node had one: to the next
    n = n - (own & move) + ((pos == x) & move)
    return np.minimum(n, R - own)


def _everywhere(
    w_BE: np.ndarray, top_BE: np.ndarray, held_BEW: np.ndarray, free_BW: np.ndarray
) -> np.ndarray:
    """t <= m: each rank takes the top-t experts it lacks, heaviest first, while it has room."""
    idx = _desc(w_BE)[..., None]
    lacks = np.take_along_axis(top_BE[..., None] & ~held_BEW, idx, 1)
    take = lacks & (lacks.cumsum(1) <= free_BW[:, None, :])
    out = np.zeros_like(take)
    np.put_along_axis(out, np.broadcast_to(idx, take.shape), take, axis=1)
    return out


def _copies_in_nodes(n_BEN: np.ndarray, share_BE: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every new copy as (bank, expert, node, its place among its node's copies), the node's
    copies ordered by share (largest first, ties: expert id)."""
    B, E, N = n_BEN.shape
    idx = np.broadcast_to(_desc(share_BE)[..., None], n_BEN.shape)
    start_BEN = np.zeros_like(n_BEN)
    by_share_BEN = excl_cumsum(np.take_along_axis(n_BEN, idx, 1), axis=1)
    np.put_along_axis(start_BEN, idx, by_share_BEN, axis=1)
    n_flat = n_BEN.reshape(-1)
    block = np.repeat(np.arange(n_flat.size), n_flat)
    at = start_BEN.reshape(-1)[block] + np.arange(block.size) - excl_cumsum(n_flat)[block]
    b, rest = block // (E * N), block % (E * N)
    return b, rest // N, rest % N, at


def _deal(
    w_BE: np.ndarray,
    top_BE: np.ndarray,
    held_BEW: np.ndarray,
    free_BW: np.ndarray,
    owner_BE: np.ndarray,
    R: int,
) -> np.ndarray:
    """t > m: [Note: proportional slots, nodes first]; the new pairs as a [B, E, W] mask."""
    B, E, W = held_BEW.shape
    N, J = W // R, int(free_BW.max())
    if J == 0:
        return np.zeros_like(held_BEW)
    h_BE = held_BEW.sum(2)
    c_BE = _dhondt(w_BE, h_BE, top_BE, free_BW.sum(1), W)
    share_BE = w_BE // np.maximum(c_BE, 1)
    planned_BW = (held_BEW * share_BE[..., None]).sum(1)
    n_BEN = _node_deal((c_BE - h_BE) * top_BE, owner_BE, share_BE, planned_BW, N, R)
    b, e, k, at = _copies_in_nodes(n_BEN, share_BE)
    share = share_BE[b, e]
    add = np.zeros_like(held_BEW)
    node_key = (np.arange(W) // R) << 50
    first = np.zeros((B, N), dtype=np.int64)  # copies of each node placed so far
    for j in range(J):  # one round per free slot (J <= m): LPT over the node's open ranks
        open_BW = free_BW > j
        order = np.argsort(node_key + ((~open_BW).astype(np.int64) << 49) + planned_BW,
                           axis=1, kind="stable")
        K_BN = open_BW.reshape(B, N, R).sum(2)
        t = at - first[b, k]
        now = (t >= 0) & (t < K_BN[b, k])
        r = order[b, k * R + np.clip(t, 0, R - 1)]
        ok = now & ~(held_BEW | add)[b, e, r]
        add[b[ok], e[ok], r[ok]] = True
        np.add.at(planned_BW.reshape(-1), (b * W + r)[ok], share[ok])
        first += K_BN
    return add | _fill_left(w_BE, top_BE, held_BEW | add, free_BW - add.sum(1), J)


def _fill_left(
    w_BE: np.ndarray, top_BE: np.ndarray, held_BEW: np.ndarray, left_BW: np.ndarray, J: int
) -> np.ndarray:
    """Slots still free take, per rank, the experts it lacks with the largest w / (c + 1)
    (ties: expert id)."""
    out = np.zeros_like(held_BEW)
    b, w = np.nonzero(left_BW > 0)
    if b.size == 0:
        return out
    prio_BE = w_BE / (held_BEW.sum(2) + 1)
    score_LE = np.where(top_BE[b] & ~held_BEW[b, :, w], prio_BE[b], -1.0)
    k = min(J, score_LE.shape[1])
    pick_LK = _desc(score_LE)[:, :k]
    ok_LK = (np.take_along_axis(score_LE, pick_LK, 1) >= 0) & (
        np.arange(k) < left_BW[b, w][:, None]
    )
    li, ki = np.nonzero(ok_LK)
    out[b[li], pick_LK[li, ki], w[li]] = True
    return out


def _with_new(o: Placement, add_EW: np.ndarray, device: torch.device) -> Placement:
    """o plus the pairs of the [E, W] mask (sorted, unique: merged on the host)."""
    W = o.world_size
    hp = host(o)
    key = np.union1d(hp.cell_P, np.flatnonzero(add_EW))  # cells e * W + r, sorted
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Placement._trusted(o.owner_E.to(device), t(key // W), t(key % W), W, cell_P=t(key))


def plan_placement_banks(
    loads_BE: Tensor, ownerships: list[Placement], topology: Topology, t: int, m: int
) -> list[Placement]:
    """Predicted placement of every bank (same E and W) in one go; see plan_placement."""
    B = len(ownerships)
    if B == 0:
        return []
    E = ownerships[0].num_experts
    t = min(max(t, 0), E)
    m = min(max(m, 0), t)
    if t == 0 or m == 0:
        return list(ownerships)
    hps = [host(o) for o in ownerships]
    loads = host_array(loads_BE).astype(np.float64)
    w_BE = np.maximum(np.round(loads * SCALE).astype(np.int64), 0)
    top_BE = _top_mask(w_BE, t)
    held_BEW = np.stack([hp.holders_EW for hp in hps])
    free_BW = np.maximum(m - np.stack([hp.replicas_W for hp in hps]), 0)
    if t <= m:
        add = _everywhere(w_BE, top_BE, held_BEW, free_BW)
    else:
        owner_BE = np.stack([hp.owner_E for hp in hps])
        add = _deal(w_BE, top_BE, held_BEW, free_BW, owner_BE, topology.ranks_per_node)
    dev = loads_BE.device
    return [_with_new(o, add[b], dev) for b, o in enumerate(ownerships)]
