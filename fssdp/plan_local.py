"""Node-local replicas: each node hosts the experts its own tokens use most, before balancing.

Legend: W ranks, E experts, N nodes of R ranks, c_NE rows that node n's ranks route to expert e,
K replicas chosen (at most N * R * slots).

# [Note: node-local replicas]
With more than one node, the rows of an expert that has no holder in their node cross that
node's NIC four times (forward out and back, backward out and back), while a replica in the
node costs one copy in (spAG) and one gradient out (spRS); the tree spAG ([Note: binomial relay]
in collectives/schedule.py) crosses each node boundary once. Per (node, expert) with no holder
there, the bytes saved are c_ne * token_bytes (one row's four crossings) and the bytes spent
copy_bytes (an expert's parameters and its gradient). Every node takes replicas of the experts
with the largest positive saving, at most `slots` per rank (R * slots per node), hottest first,
dealt round robin over the node's ranks from the least loaded (the base placement's even split).
Exact balancing then runs on top ([Note: exact mode] in fssdp/plan_exact.py): these replicas
count against m there and take cuts without a slot. The planner leaves every rank at least one
slot for it (slots <= m - 1): with all m slots spent on locality, the owner of the hottest
experts had nowhere to shed its rows (a measured 3x busiest rank on Zipf counts). The even
split of an expert over its holders ([Note: even split, then nearest replica] in
fssdp/quotas.py) gives each node about its own rows of it (every rank routes alike), so those
rows stay inside the node: the all-to-all's inter-node bytes fall (EP's hot experts cost every
other node's NIC; here one copy each). The rule compares bytes on the same links, so it needs
no bandwidth; on one node it adds nothing.
Integer host-array code ([Note: the control plane on the host] in fssdp/host.py), O(N E + W),
ties by expert id: every rank plans the same replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from collectives.placement import Placement, Topology
from fssdp.host import from_cells, host, host_array
from fssdp.quotas import holder_rows, load_W


@dataclass(frozen=True)
class Locality:
    """What [Note: node-local replicas] weighs: bytes per row and per expert copy."""

    token_bytes: int  # one row's four NIC crossings: 2 * (in + out features) * element size
    copy_bytes: int  # one expert's parameters + its gradient on the wire
    slots: int  # replicas per rank it may place (of the memory cap m)

    def __post_init__(self) -> None:
        if self.token_bytes < 0 or self.copy_bytes < 0 or self.slots < 0:
            raise ValueError(f"Locality: sizes and slots must be >= 0, got {self}")


def node_local_replicas(
    counts_WE: Tensor, base: Placement, topology: Topology, loc: Locality
) -> Placement:
    """`base` plus [Note: node-local replicas] for the validated [W, E] counts."""
    W, E = counts_WE.shape
    R, N = topology.ranks_per_node, topology.num_nodes
    if N == 1 or loc.slots == 0 or E == 0 or loc.token_bytes == 0:
        return base
    counts = host_array(counts_WE)
    hb = host(base)
    c_NE = counts.reshape(N, R, E).sum(1)
    held_NE = hb.holders_EW.reshape(E, N, R).any(2).T
    saving_NE = c_NE * loc.token_bytes - loc.copy_bytes
    saving_NE[held_NE] = -1
    k = min(R * loc.slots, E)
    # hottest first, ties by expert id: stable sort of -saving
    order_NE = np.argsort(-saving_NE, axis=1, kind="stable")[:, :k]
    take_NK = np.take_along_axis(saving_NE, order_NE, 1) > 0
    if not take_NK.any():
        return base
    if base.is_ownership_only():  # the usual base: each owner computes its experts' rows
        rows_W = load_W(counts.sum(0), hb.owner_E, W)
    else:
        rows_W = load_W(holder_rows(counts_WE, base, topology), hb.rank_P, W)
    by_load_NR = np.argsort(rows_W.reshape(N, R), axis=1, kind="stable")  # least loaded first
    n_K, j_K = np.nonzero(take_NK)
    rank_K = n_K * R + by_load_NR[n_K, j_K % R]
    # new pairs only (held ones were never taken), in range: sorted cells, no validation
    return from_cells(base, np.sort(np.concatenate([hb.cell_P, order_NE[take_NK] * W + rank_K])))
