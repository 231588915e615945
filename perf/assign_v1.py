"""Topology-aware token assignment: which holder computes each (token, expert) row.

Legend: W ranks, E experts, s a source rank (where the rows are routed), h a holder rank (one
that holds the expert, owner or replica), L_e the rows of expert e over all sources.

Every rank runs `assign_tokens` on the same all-gathered count matrix [W, E] and gets the same
plan, so no negotiation is needed before the all-to-all.


Today's pre-vectorisation assignment (fssdp/assign.py at commit f334c87),
copied from git ONLY for the benchmark (perf/bench_planner.py) and as a reference in tests;
the runtime uses fssdp.planner / fssdp.assign.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collectives.placement import Placement, Topology

Chunk = tuple[int, int]  # (dest_rank, n_rows)
Plan = list[list[list[Chunk]]]  # plan[s][e] -> chunks of source s's rows of expert e

# [Note: even split, then nearest replica]
# The point of replicas is balance, so balance is the hard rule: expert e's L_e rows are split
# over its holders H_e in quotas of floor(L_e / |H_e|), and the L_e mod |H_e| leftover rows go
# one each to holders picked in a fixed order (see `holder_quotas`). Locality only decides *which*
# rows fill each quota, by a greedy in three passes over the sources in rank order:
#   1. local: a holder keeps min(own rows, quota) of its own rows (they never move);
#   2. node: the rest of a node's rows fill the free quota of holders in the same node;
#   3. cross: whatever is left goes to the holders with free quota in other nodes.
# Passes 2 and 3 walk sources and holders in rank order with two pointers, so a source's rows of
# one expert are cut into at most a few chunks. Consequence: rows cross nodes only when their
# node's holders are full (or absent); when each node's rows of e equal its holders' quota (e.g.
# uniform counts and the same number of holders per node) nothing crosses nodes. A node with
# more rows than its holders' quota does send the excess away: balance wins over locality.

# [Note: levelling quotas]
# An even split per expert balances each replicated expert but not the ranks: an owner also
# computes all rows of its unreplicated experts, so under skew the rank owning the hot experts'
# neighbours stays the straggler (seen: 1.1-1.4x by rows at world 2 with the two hottest experts
# on every rank). Levelling fixes it with the replicas already there: unreplicated experts fix a
# base load per rank; replicated experts, fewest holders first (then most rows, then id), pour
# their rows into their holders like water, lowest-loaded holder first, up to a common level
# (leftover rows one each by `holder_quotas`' order). Levelling happens inside each node: a node
# computes exactly the rows of e the even split gives its holders, so no more rows cross nodes
# than before. It moves more rows between ranks of a node, so it is used only when it lowers the
# busiest rank's rows by more than LEVEL_GAIN of them; otherwise the even split stands. Both
# come from the all-gathered count matrix alone, so every rank still gets the same plan.
LEVEL_GAIN = 0.02


def as_count_matrix(counts_WE: Any, world_size: int, num_experts: int) -> list[list[int]]:
    """counts_WE (nested lists or a tensor) as a validated [W][E] list of non-negative ints."""
    rows = counts_WE.tolist() if hasattr(counts_WE, "tolist") else counts_WE
    if len(rows) != world_size:
        raise ValueError(f"counts_WE has {len(rows)} rows, expected one per rank (W={world_size})")
    out: list[list[int]] = []
    for s, row in enumerate(rows):
        if len(row) != num_experts:
            raise ValueError(
                f"counts_WE[{s}] has {len(row)} entries, expected one per expert (E={num_experts})"
            )
        vals = [int(c) for c in row]
        if any(c < 0 for c in vals):
            raise ValueError(f"counts_WE[{s}] has a negative count: {vals}")
        out.append(vals)
    return out


def holder_quotas(col_W: Sequence[int], holders: Sequence[int], topology: Topology) -> list[int]:
    """Rows each holder (sorted rank order) computes for one expert with per-source rows col_W.

    Quota = floor(L / |H|); the leftover rows go one each, in this order: holders whose own rows
    exceed the base quota (an extra local row saves a move), then holders whose node has the
    most rows beyond its holders' quota so far (saves a cross-node move), then lowest rank.
    """
    total = sum(col_W)
    q, rem = divmod(total, len(holders))
    quota = [q] * len(holders)
    if rem == 0:
        return quota
    node_excess: dict[int, int] = {}
    for s, c in enumerate(col_W):
        n = topology.node_of(s)
        node_excess[n] = node_excess.get(n, 0) + c
    for h in holders:
        node_excess[topology.node_of(h)] -= q
    for _ in range(rem):
        best = min(
            (i for i in range(len(holders)) if quota[i] == q),
            key=lambda i: (
                col_W[holders[i]] <= q,
                -node_excess[topology.node_of(holders[i])],
                holders[i],
            ),
        )
        quota[best] += 1
        node_excess[topology.node_of(holders[best])] -= 1
    return quota


def _fill(
    left_S: dict[int, int], free_H: dict[int, int], sources: list[int], dests: list[int]
) -> list[tuple[int, int, int]]:
    """Two-pointer transport of sources' leftover rows into dests' free quota: (s, h, n)."""
    moves: list[tuple[int, int, int]] = []
    i = j = 0
    while i < len(sources) and j < len(dests):
        s, h = sources[i], dests[j]
        n = min(left_S[s], free_H[h])
        if n:
            moves.append((s, h, n))
            left_S[s] -= n
            free_H[h] -= n
        if left_S[s] == 0:
            i += 1
        if free_H[h] == 0:
            j += 1
    return moves


def _level(loads: list[int], total: int) -> tuple[list[int], int, list[int]]:
    """Water-fill `total` rows over holders with `loads`: (quotas, leftover rows, holders at
    the level). Quotas lift the least-loaded holders to a common integer level; the caller hands
    the leftover rows, one each, to holders at that level.
    """
    n = len(loads)
    order = sorted(range(n), key=lambda i: (loads[i], i))
    k, filled = 1, loads[order[0]] + total
    while k < n and filled > k * loads[order[k]]:  # level still above the next holder's load
        filled += loads[order[k]]
        k += 1
    level, rem = divmod(filled, k)
    quota = [0] * n
    for i in order[:k]:
        quota[i] = level - loads[i]
    return quota, rem, order[:k]


def _leftover_order(col_W: Sequence[int], holders: Sequence[int], quota: list[int]) -> list[int]:
    """Indices of holders in the order leftover rows go: more own rows than quota first."""
    return sorted(range(len(holders)), key=lambda i: (col_W[holders[i]] <= quota[i], holders[i]))


def expert_quotas(
    counts: list[list[int]], placement: Placement, topology: Topology
) -> list[dict[int, int]]:
    """Rows each holder computes, per expert: [Note: levelling quotas] when it pays, else the
    even split of [Note: even split, then nearest replica]."""
    W, E = topology.world_size, placement.num_experts
    cols = [[counts[s][e] for s in range(W)] for e in range(E)]
    holders = [sorted(placement.holders[e]) for e in range(E)]
    even = [dict(zip(holders[e], holder_quotas(cols[e], holders[e], topology))) for e in range(E)]
    level = [dict.fromkeys(hs, 0) for hs in holders]
    load = [0] * W
    for e in range(E):
        if len(holders[e]) == 1:
            level[e] = {holders[e][0]: sum(cols[e])}
            load[holders[e][0]] += sum(cols[e])
    multi = [e for e in range(E) if len(holders[e]) > 1 and any(cols[e])]
    if not multi:  # every loaded expert has one holder (EP): both rules agree
        return even
    for e in sorted(multi, key=lambda e: (len(holders[e]), -sum(cols[e]), e)):
        for node in range(topology.num_nodes):  # a node computes what the even split gives it
            hs = [h for h in holders[e] if topology.node_of(h) == node]
            if not hs:
                continue
            quota, rem, tied = _level([load[h] for h in hs], sum(even[e][h] for h in hs))
            for i in [i for i in _leftover_order(cols[e], hs, quota) if i in tied][:rem]:
                quota[i] += 1
            for h, q in zip(hs, quota):
                level[e][h] = q
                load[h] += q
    return level if max(load) < (1 - LEVEL_GAIN) * max(_rows(even, W)) else even


def _rows(quotas: list[dict[int, int]], W: int) -> list[int]:
    rows = [0] * W
    for q in quotas:
        for h, n in q.items():
            rows[h] += n
    return rows


def _assign_expert(
    col_W: Sequence[int], quota_H: dict[int, int], topology: Topology
) -> list[tuple[int, int, int]]:
    """(source, dest, n) moves for one expert; see [Note: even split, then nearest replica]."""
    holders = sorted(quota_H)
    free_H = dict(quota_H)
    left_S = {s: c for s, c in enumerate(col_W) if c}
    moves: list[tuple[int, int, int]] = []
    for h in holders:  # 1. local
        keep = min(left_S.get(h, 0), free_H[h])
        if keep:
            moves.append((h, h, keep))
            left_S[h] -= keep
            free_H[h] -= keep
    for node in range(topology.num_nodes):  # 2. same node
        srcs = [s for s in sorted(left_S) if left_S[s] and topology.node_of(s) == node]
        dsts = [h for h in holders if free_H[h] and topology.node_of(h) == node]
        moves += _fill(left_S, free_H, srcs, dsts)
    srcs = [s for s in sorted(left_S) if left_S[s]]  # 3. cross node
    moves += _fill(left_S, free_H, srcs, [h for h in holders if free_H[h]])
    assert not any(left_S.values()), "assign: quotas must absorb every row"
    return moves


def assign_tokens(counts_WE: Any, placement: Placement, topology: Topology) -> Plan:
    """plan[s][e] = [(dest_rank, n_rows), ...]: where source s sends its rows of expert e.

    A source's rows of expert e are cut in chunk order: the first n rows go to the first chunk's
    dest, and so on. Chunks are sorted by dest rank, never empty, and each dest holds e.
    counts_WE may be a [W, E] tensor or nested sequences.
    """
    W, E = topology.world_size, placement.num_experts
    if placement.world_size != W:
        raise ValueError(
            f"assign_tokens: placement is for world {placement.world_size}, topology for {W}"
        )
    counts = as_count_matrix(counts_WE, W, E)
    quotas = expert_quotas(counts, placement, topology)
    plan: Plan = [[[] for _ in range(E)] for _ in range(W)]
    for e in range(E):
        col_W = [counts[s][e] for s in range(W)]
        if not any(col_W):
            continue
        for s, h, n in sorted(_assign_expert(col_W, quotas[e], topology)):
            chunks = plan[s][e]
            if chunks and chunks[-1][0] == h:  # defensive: one chunk per (source, dest)
                chunks[-1] = (h, chunks[-1][1] + n)
            else:
                chunks.append((h, n))
    return plan


def rows_per_rank(counts_WE: Any, plan: Plan) -> list[int]:
    """Rows each rank computes under `plan` (counts_WE only fixes W and checks the plan)."""
    W = len(plan)
    rows = [0] * W
    for per_e in plan:
        for chunks in per_e:
            for h, n in chunks:
                rows[h] += n
    total = sum(sum(r) for r in as_count_matrix(counts_WE, W, len(plan[0]) if W else 0))
    if total != sum(rows):
        raise ValueError(f"rows_per_rank: plan moves {sum(rows)} rows but counts hold {total}")
    return rows


def send_counts(plan: Plan, src: int, world: int) -> list[int]:
    """Rows `src` sends to each dest rank (its own entry counts rows that stay local)."""
    out = [0] * world
    for chunks in plan[src]:
        for h, n in chunks:
            out[h] += n
    return out
