"""The sparse collectives' time in the simulator, round by round on the link model.

Legend: T transfers (expert, src, dst) of a schedule, each of one expert's bytes; rounds run
one after another, the transfers of a round at once ([Note: link model] in perf/cost_model.py:
a round takes its busiest device link's or node NIC's bytes over that link's bandwidth, plus
one latency).

[Note: pricing the runtime's spAG]
The runtime moves a replica set with one of two schedules (collectives/algorithms/): `a2a`, one
round in which each owner sends every new holder its copy (an owner with many new holders, or
a node receiving one expert on several ranks, pays for each copy on its links); `tree`
([Note: binomial relay] in collectives/schedule.py), in which holders relay; and `tree_nodes`
([Note: node relays]), which crosses nodes once per receiving node and fans out inside it.
`spag_s` prices the three on the link model and takes the cheapest. The runtime's `auto`
picks by its alpha-beta cost model, which does not know the links, so on clusters of several
nodes `parallel.collective_algorithm=tree_nodes` is what this price assumes; the simulator's
choice is an upper bound on how well `auto` chooses. The spRS runs the same schedule
backwards: the same links carry the gradients, so its time is the same formula in gradient
bytes.

[Note: overlapped rounds]
A sparse collective issued `hide` seconds of work before it is needed exposes what of its
schedule exceeds them (`spag_exposed_s`): the runtime runs every round on the group's worker
thread ([Note: rounds in the background] in collectives/progress.py), a tree's relays
included, so the whole schedule overlaps. (Until stop 34 the runtime ran a tree's later rounds
inside the caller's wait, and this price, which took the whole schedule to hide, was
optimistic for trees.) The same holds for the spRS behind the backward. Each collective also
pays its hand-off to the worker and back (`handoff_s`, measured here in-process).

FasterMoE's shadows are broadcast by NCCL to every rank, a pipelined ring: every device link
and every NIC carries each shadowed expert about once (`broadcast_s`).
"""

from __future__ import annotations

import functools

import numpy as np

from collectives.placement import Placement, Topology
from collectives.progress import round_trip_s
from collectives.schedule import Diff, Schedule, direct_from, tree_from, tree_nodes_from
from perf.cost_model import Cluster


def rounds_s(sched: Schedule, nbytes: float, c: Cluster) -> float:
    """Time of `sched` with `nbytes` per transfer, per the module's rule."""
    if not sched.num_transfers:
        return 0.0
    x = sched.xfer_M3
    src, dst = x[:, 1], x[:, 2]
    rnd = sched.round_M
    R = len(sched)
    same = (src // c.per_node) == (dst // c.per_node)
    t = 0.0
    for k in range(R):
        sel = rnd == k
        intra = sel & same
        inter = sel & ~same
        busiest = 0.0
        if intra.any():
            out = np.bincount(src[intra], minlength=c.world).max()
            inn = np.bincount(dst[intra], minlength=c.world).max()
            busiest = max(busiest, max(out, inn) * nbytes / c.intra_bw)
        if inter.any():
            out = np.bincount(src[inter] // c.per_node, minlength=c.nodes).max()
            inn = np.bincount(dst[inter] // c.per_node, minlength=c.nodes).max()
            busiest = max(busiest, max(out, inn) * nbytes / c.inter_bw)
        t += busiest + c.latency_s
    return t


def spag_s(base: Placement, p: Placement, c: Cluster, *nbytes: float) -> list[float]:
    """Times of the spAG base -> p for each size in `nbytes` (parameters; gradients for its
    spRS), each the cheapest schedule's; the schedules are built once."""
    d = Diff.of(base, p)
    if not d.expert_N.size:
        return [0.0] * len(nbytes)
    topo = Topology(c.world, c.per_node)
    scheds = (direct_from(d), tree_from(d, topo), tree_nodes_from(d, topo))
    return [min(rounds_s(s, n, c) for s in scheds) for n in nbytes]


def spag_exposed_s(
    base: Placement, p: Placement, c: Cluster, jobs: list[tuple[float, float]]
) -> list[float]:
    """Exposed time of the spAG base -> p (or its spRS, same schedule) for each (bytes per
    copy, seconds of work it is issued behind), per [Note: overlapped rounds]; the schedule
    with the least exposed time, built once."""
    d = Diff.of(base, p)
    if not d.expert_N.size:
        return [0.0] * len(jobs)
    topo = Topology(c.world, c.per_node)
    scheds = (direct_from(d), tree_from(d, topo), tree_nodes_from(d, topo))
    hand = handoff_s()
    return [
        max(0.0, hand + min(rounds_s(s, n, c) for s in scheds) - hide_s) for n, hide_s in jobs
    ]


@functools.cache
def handoff_s() -> float:
    """The hand-off of one collective to its group's worker thread and back, measured once per
    process on this machine (`collectives.progress.round_trip_s`), as planning is."""
    return round_trip_s()


def broadcast_s(k: int, c: Cluster, nbytes: float) -> float:
    """k experts broadcast to every rank, one pipelined NCCL broadcast each."""
    if k <= 0 or c.world <= 1:
        return 0.0
    bw = min(c.intra_bw, c.inter_bw) if c.nodes > 1 else c.intra_bw
    return k * (nbytes / bw + c.latency_s)
