"""'tree_nodes': the binomial tree relayed through one rank per node ([Note: node relays] in
collectives/schedule.py): an expert crosses nodes once per receiving node, then fans out over
the node's links. It runs as 'tree' does, round by round point to point; only the schedule
differs. On one node it is the tree's schedule (and 'auto' prefers 'tree' on a tie)."""

from __future__ import annotations

from collectives.algorithms.base import register
from collectives.algorithms.tree import BinomialTree
from collectives.placement import Topology
from collectives.schedule import Diff, Schedule, tree_nodes_from


@register
class NodeRelayTree(BinomialTree):
    name = "tree_nodes"

    @classmethod
    def build_schedule(cls, diff: Diff, topology: Topology | None) -> Schedule:
        return tree_nodes_from(diff, topology)
