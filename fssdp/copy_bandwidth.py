"""The bandwidth probe: what one expert copy costs on each kind of link, measured once.

[Note: copies per link]
A prefetched spAG's copies travel over two kinds of link: the device links inside a node
(NVLink, shared memory) and the node's NIC across nodes. Their speeds differ by one to two
orders of magnitude, so one blended figure misprices both: a ring over all ranks measures the
NIC wherever it crosses one and caps every copy at that speed (at 8 GPUs per node that let no
copy fit behind an attention forward at 100-400 Gb/s, though dozens fit over NVLink). The probe
runs one synchronous spAG per kind of link that exists:
- intra: each expert to the next rank of its owner's node (one node: this is every link);
- inter: each expert to the rank of the same local index on the next node (NIC only).
Each figure is the slowest receiving rank's bytes/s (MIN over ranks; a rank that receives
nothing reports nothing). Replicating the top t experts to every rank puts about t copies on
each device link and, with the node-relay tree, about t on each NIC, so the overlap degree and
the cost gate budget with the slower of the two (`degree_bandwidth`), as the simulator does
(perf/sim_fssdp.py `_spag_bw`).

[Note: why bandwidth is measured once, synchronously]
The prefetched transfer's issue-to-completion time includes the dense work it hides behind
whenever the transfer cannot progress during compute (gloo on busy cores): a bandwidth derived
from it shrinks the overlap degree, which shrinks the next transfer, and the planner collapses
to no replicas. A synchronous transfer measures the link.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from collectives.comm import backend_device
from collectives.placement import Placement, Topology
from collectives.sparse import sparse_all_gather


@dataclass(frozen=True)
class LinkBandwidth:
    """Measured bytes/s per kind of link; inf where that kind of link does not exist."""

    intra: float = math.inf  # device links inside a node
    inter: float = math.inf  # the NIC, across nodes

    @property
    def degree_bandwidth(self) -> float:
        """The slower link's figure ([Note: copies per link]); 0 when nothing was measured."""
        slowest = min(self.intra, self.inter)
        return 0.0 if math.isinf(slowest) else slowest


def intra_node_target(topology: Topology) -> Callable[[int], int] | None:
    """Rank -> the next rank of its node (None: one rank per node, no device links)."""
    rpn = topology.ranks_per_node
    if rpn == 1:
        return None
    return lambda r: (r // rpn) * rpn + (r % rpn + 1) % rpn


def inter_node_target(topology: Topology) -> Callable[[int], int] | None:
    """Rank -> the same local rank on the next node (None: one node, no NIC)."""
    rpn, nodes = topology.ranks_per_node, topology.num_nodes
    if nodes == 1:
        return None
    return lambda r: ((r // rpn + 1) % nodes) * rpn + r % rpn


def probe_links(
    rows: torch.Tensor,
    ownership: Placement,
    topology: Topology,
    group: dist.ProcessGroup | None,
    algorithm: str,
    timeout_s: float,
) -> LinkBandwidth:
    """Both probes of [Note: copies per link]; every rank of `group` must call it alike.
    `rows` are this rank's owned rows of one bank, in the dtype the spAG moves."""
    figures = {}
    for kind, target in (
        ("intra", intra_node_target(topology)),
        ("inter", inter_node_target(topology)),
    ):
        if target is not None:
            figures[kind] = _probe(rows, ownership, target, group, algorithm, timeout_s, kind)
    return LinkBandwidth(**figures)


def _probe(
    rows: torch.Tensor,
    ownership: Placement,
    target: Callable[[int], int],
    group: dist.ProcessGroup | None,
    algorithm: str,
    timeout_s: float,
    kind: str,
) -> float:
    """Bytes/s of one synchronous spAG sending every expert to target(owner), MIN over the
    ranks that received something (inf when none did: no expert crossed such a link)."""
    owner = ownership.owner
    moves = {e: target(owner[e]) for e in range(ownership.num_experts)}
    to = ownership.with_replicas({e: [r] for e, r in moves.items() if r != owner[e]})
    dist.barrier(group=group)
    t0 = time.perf_counter()
    _, st = sparse_all_gather(
        rows.detach(), ownership, to, group,
        algorithm=algorithm, phase=f"bandwidth probe ({kind}-node)", timeout_s=timeout_s,
    )
    elapsed = time.perf_counter() - t0
    mine = st.bytes_recv / max(elapsed, 1e-9) if st.bytes_recv > 0 else math.inf
    bw = torch.tensor([mine], dtype=torch.float64, device=backend_device())
    dist.all_reduce(bw, op=dist.ReduceOp.MIN, group=group)
    return max(float(bw.item()), 1.0)
