"""Exact mode across nodes: each node's rows of an expert kept on its holders there.

Legend: W ranks, E experts, N nodes of R ranks, P holder pairs of the base placement (sorted by
expert, then rank), g a group = (expert, node) at index e * N + node, S cuts, T candidates.
Integer host-array code ([Note: the control plane on the host] in fssdp/host.py).

# [Note: node-first rows]
# Node-local replicas ([Note: node-local replicas] in fssdp/plan_local.py) give a node a holder
# of the experts its own ranks use most. Exact mode then starts from each base pair's rows; the
# even split ([Note: even split, then nearest replica] in fssdp/quotas.py) gives every holder
# L_e / |H_e| of them, so the node that holds the owner *and* computes for the nodes without a
# holder ends with more than its own rows, and the rest with less: a simulated layer at 64
# A100s, skewed, sent 66k of its hottest expert's 516k rows across nodes that way while every
# node had a holder of it. Here a node's holders of e start with that node's own rows of e,
# split evenly among them; the rows of nodes with no holder go to the owner. Every row is still
# planned exactly once (the rows of e sum to L_e), so any candidate's planned rows stay valid.
#
# [Note: grouped rooms]
# With node-first rows a node's pieces are its own rows. Candidates whose pieces *and* rooms are
# laid out node by node (node 0's pieces, largest first, against node 0's rooms, in the
# candidate's size order; then node 1's, …) cut a node's pieces into its own rooms wherever a
# node's pieces and rooms are the same size, which they are when each node keeps its own rows
# (every rank routes the same number of rows); a node with more pieces than rooms spills into
# the next node's rooms. From the ownership alone (no node-local replica) a hot expert's one
# piece holds rows of every node, and there the dealt rooms ([Note: rooms dealt over nodes] in
# fssdp/plan_exact.py) cross fewer: in the simulator's runs (16-256 A100s, 64 and 256 experts)
# a grouped candidate never won on an ownership, and a node-blind one rarely won on top of
# node-local replicas. So a base with replicas gets the six grouped and the six dealt
# candidates, an ownership the dealt and the node-blind ones (twelve either way).
# The winner is the cheapest by busiest rank * N + rows leaving their node (`cross_node_rows`:
# per (expert, node), the node's rows above its holders' planned rows must leave; summed over
# groups that is every crossing row once, the rows the dispatcher then sends, fssdp/fill.py).
# Rows leaving their node over N are about one NIC's share of them, and a row crossing a NIC
# costs about what a row of expert compute does on the clusters the simulator models
# (GPT-MoE-S/L: 0.5-1.7x, four crossings of d_model activations at 100-400 Gb/s per node
# against 6 d_model h FLOPs at the cards' rates), so the two weigh alike; ties: the first.
"""

from __future__ import annotations

import numpy as np

from collectives.placement import Topology
from fssdp.host import HostPlacement
from fssdp.segments import excl_cumsum

DENSE_PER_KEY = 4  # cells a dense sum may take per key before sorting the keys is cheaper


def rows_by_node(counts_WE: np.ndarray, topology: Topology) -> np.ndarray:
    """c_G: rows each node's ranks route to each expert, at e * N + node."""
    N, R = topology.num_nodes, topology.ranks_per_node
    return counts_WE.reshape(N, R, -1).sum(1).T.ravel()


def node_first_rows(c_G: np.ndarray, hp: HostPlacement, topology: Topology) -> np.ndarray:
    """rows_P of [Note: node-first rows] (pairs sorted by expert, then rank) for the rows per
    node and expert c_G (`rows_by_node`)."""
    E, N, R = hp.num_experts, topology.num_nodes, topology.ranks_per_node
    g_P = hp.expert_P * N + hp.rank_P // R  # sorted: pairs are by expert, then rank
    k_G = np.bincount(g_P, minlength=E * N)
    held_G = k_G > 0
    T_G = c_G * held_G
    orphan_E = (c_G * ~held_G).reshape(E, N).sum(1)
    T_G[np.arange(E) * N + hp.owner_E // R] += orphan_E  # the owner's group always holds
    j_P = np.arange(g_P.size) - excl_cumsum(k_G)[g_P]
    T_P, n_P = T_G[g_P], k_G[g_P]
    return (T_P * (j_P + 1)) // n_P - (T_P * j_P) // n_P


def node_shortfall(
    c_G: np.ndarray, hp: HostPlacement, topology: Topology, base_rows_P: np.ndarray
) -> np.ndarray:
    """short_G: per (expert, node), the node's rows c_G (`rows_by_node`) above its holders'
    rows when the base pairs compute base_rows_P (> 0: rows that must leave the node)."""
    E, N, R = hp.num_experts, topology.num_nodes, topology.ranks_per_node
    q_G = np.bincount(hp.expert_P * N + hp.rank_P // R, base_rows_P, E * N)
    return c_G - q_G.astype(np.int64)


def cross_node_rows(
    short_G: np.ndarray,
    topology: Topology,
    cuts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    b_T: np.ndarray,
) -> np.ndarray:
    """Rows that leave their node under each candidate b_T[t] ([Note: grouped rooms]), from
    the base's `node_shortfall`.

    `cuts` = (b_S, e_S, u_S, src_S, n_S) of fssdp.plan_exact.Cuts: n_S rows of expert e_S move
    from src_S to u_S in candidate b_S."""
    N, R = topology.num_nodes, topology.ranks_per_node
    base = int(np.maximum(short_G, 0).sum())
    if not b_T.size:
        return np.zeros(0, dtype=np.int64)
    b_S, e_S, u_S, src_S, n_S = cuts
    t_of_b = np.full(int(b_S.max(initial=0)) + 1, -1, dtype=np.int64)
    t_of_b[b_T] = np.arange(b_T.size)
    t_S = t_of_b[b_S]
    sel = (t_S >= 0) & (n_S > 0) & (u_S // R != src_S // R)
    t, e, n = t_S[sel], e_S[sel], n_S[sel]
    if not t.size:  # no cut crosses a node boundary
        return np.full(b_T.size, base, dtype=np.int64)
    # only the experts that some crossing cut moves: their groups, renumbered
    moved_E = np.bincount(e, minlength=short_G.size // N) > 0
    short_G = short_G.reshape(-1, N)[moved_E].ravel()
    e = (np.cumsum(moved_E) - 1)[e]
    G = short_G.size
    keys = np.concatenate([t * G + e * N + u_S[sel] // R, t * G + e * N + src_S[sel] // R])
    rows = np.concatenate([n, -n])
    if b_T.size * G <= DENSE_PER_KEY * keys.size:  # dense is cheaper than sorting the keys
        delta_TG = np.bincount(keys, rows, b_T.size * G).astype(np.int64).reshape(-1, G)
        return base + (np.maximum(short_G - delta_TG, 0) - np.maximum(short_G, 0)).sum(1)
    uk, inv = np.unique(keys, return_inverse=True)
    delta = np.bincount(inv, rows, uk.size).astype(np.int64)
    s = short_G[uk % G]
    change = np.maximum(s - delta, 0) - np.maximum(s, 0)
    return base + np.bincount(uk // G, change, b_T.size).astype(np.int64)
