"""Ownership of experts across ranks (P0) for all expert banks jointly (DESIGN.md §2).

Legend: W ranks, b a bank (one MoE layer's experts, named by its module path), E_b its experts,
N = Σ_b E_b expert slots in all. owner[b][e] = the rank that owns expert e of bank b: it holds
the parameters, the gradient accumulator and the only copy of the optimizer state.

All functions are pure and deterministic (banks are visited in sorted-name order where order is
not set by load; ties break by expert id, then rank id), so every rank computes the same layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from collectives.placement import Topology


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
    return [e * world_size // num_experts for e in range(num_experts)]


def balanced_uniform_sharding(banks: Mapping[str, int], topology: Topology) -> dict[str, list[int]]:
    """First-step layout (no load history): every rank owns N // W or N // W + 1 experts.

    Per bank (sorted names) each rank gets E_b // W experts; the E_b mod W leftover experts go to
    the ranks with the fewest slots so far (ties: lowest rank), which keeps totals within ±1 and
    ends with the first (N mod W) ranks one up. Experts are laid out in contiguous rank blocks,
    so one bank with E divisible by W gets exactly `contiguous_sharding`.
    """
    W = topology.world_size
    used = [0] * W
    out: dict[str, list[int]] = {}
    for name in sorted(banks):
        E = int(banks[name])
        if E < 0:
            raise ValueError(f"balanced_uniform_sharding: bank {name!r} has {E} experts")
        q, rem = divmod(E, W)
        per_rank = [q] * W
        for r in sorted(range(W), key=lambda r: (used[r], r))[:rem]:
            per_rank[r] += 1
        out[name] = [r for r in range(W) for _ in range(per_rank[r])]
        used = [u + n for u, n in zip(used, per_rank)]
    return out


# [Note: heterogeneous sharding]
# Every rank gets the same number of expert slots in total (slot_counts), but a bank may put
# anywhere from 0 to E_b of its experts on one rank: slot balance is global, load balance is per
# bank. Each bank's top-t experts (t = set_aside[b], the ones planning will replicate anyway)
# are set aside. The rest are placed first, longest-processing-time style: banks in order of
# their heaviest remaining expert (ties: name), each bank's experts heaviest first (ties: id),
# each on the node with the least load, then the rank in it with the least load, among those
# with a free slot (ties: lowest id). Then the set-aside experts of all banks fill the remaining
# slots, heaviest first (ties: bank name, expert id), by the same rule. Deviation from the plain
# "sum of loads" wording: "load" is first this bank's load placed on the node / rank (banks run
# one after another, so a rank's time in bank b depends on bank b's experts only), then the load
# of all banks placed there as the tie-break. Experts with equal load spread like round robin
# over nodes.


class _Layout:
    """Free slots and placed load per rank while experts are being placed."""

    def __init__(self, names: list[str], total: int, topology: Topology) -> None:
        self.topology = topology
        self.free = slot_counts(total, topology.world_size)
        self.total_load = [0.0] * topology.world_size
        self.bank_load = {b: [0.0] * topology.world_size for b in names}

    def _node_ranks(self, node: int) -> range:
        rpn = self.topology.ranks_per_node
        return range(node * rpn, (node + 1) * rpn)

    def place(self, bank: str, load: float) -> int:
        """Put one expert of `bank` with `load` on the least-loaded node, then rank; its rank."""
        bl, tl = self.bank_load[bank], self.total_load

        def node_key(n: int) -> tuple[float, float, int]:
            ranks = self._node_ranks(n)
            return sum(bl[r] for r in ranks), sum(tl[r] for r in ranks), n

        nodes = [
            n
            for n in range(self.topology.num_nodes)
            if any(self.free[r] for r in self._node_ranks(n))
        ]
        node = min(nodes, key=node_key)
        rank = min(
            (r for r in self._node_ranks(node) if self.free[r]), key=lambda r: (bl[r], tl[r], r)
        )
        self.free[rank] -= 1
        bl[rank] += load
        tl[rank] += load
        return rank


def _top_ids(load: list[float], t: int) -> list[int]:
    return sorted(range(len(load)), key=lambda e: (-load[e], e))[:t]


def heterogeneous_sharding(
    loads: Mapping[str, Sequence[float] | Any], topology: Topology, set_aside: Mapping[str, int]
) -> dict[str, list[int]]:
    """Bank name -> owner rank per expert; see [Note: heterogeneous sharding]."""
    names = sorted(loads)
    unknown = sorted(set(set_aside) - set(names))
    if unknown:
        raise ValueError(f"heterogeneous_sharding: set_aside names unknown banks {unknown}")
    vals = {b: [float(v) for v in _as_list(loads[b])] for b in names}
    aside: dict[str, set[int]] = {}
    for b in names:
        t = int(set_aside.get(b, 0))
        if t < 0:
            raise ValueError(f"heterogeneous_sharding: set_aside[{b!r}] = {t} must be >= 0")
        aside[b] = set(_top_ids(vals[b], t))
    layout = _Layout(names, sum(len(v) for v in vals.values()), topology)
    owner = {b: [-1] * len(vals[b]) for b in names}
    rest = {b: [e for e in _top_ids(vals[b], len(vals[b])) if e not in aside[b]] for b in names}
    bank_order = sorted((b for b in names if rest[b]), key=lambda b: (-vals[b][rest[b][0]], b))
    for b in bank_order:
        for e in rest[b]:
            owner[b][e] = layout.place(b, vals[b][e])
    late = sorted(((b, e) for b in names for e in aside[b]), key=lambda p: (-vals[p[0]][p[1]], p))
    for b, e in late:
        owner[b][e] = layout.place(b, vals[b][e])
    return owner


def _as_list(x: Any) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


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
    return [(e, a, b) for e, (a, b) in enumerate(zip(old_owner, new_owner)) if a != b]
