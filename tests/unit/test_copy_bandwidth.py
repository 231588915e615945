"""fssdp/copy_bandwidth.py without ranks: the probes' targets stay on their kind of link (inside a
node: another rank of the same node; across nodes: the same local rank on another node), each
is a permutation without fixed points (every rank sends and receives), a topology without such
links has no probe, and the degree's bandwidth is the slower measured link."""

from __future__ import annotations

import math

import pytest

from collectives.placement import Topology
from fssdp.copy_bandwidth import LinkBandwidth, inter_node_target, intra_node_target


@pytest.mark.parametrize("world,rpn", [(8, 4), (8, 2), (16, 8), (6, 3)])
def test_targets_stay_on_their_kind_of_link(world: int, rpn: int) -> None:
    topo = Topology(world, rpn)
    intra, inter = intra_node_target(topo), inter_node_target(topo)
    assert intra is not None and inter is not None
    for target, same_node in ((intra, True), (inter, False)):
        images = [target(r) for r in range(world)]
        assert sorted(images) == list(range(world))  # a permutation: everyone receives
        for r, t in enumerate(images):
            assert t != r and (topo.node_of(t) == topo.node_of(r)) == same_node, (r, t)
    assert all(inter(r) % rpn == r % rpn for r in range(world))


def test_topologies_without_a_kind_of_link_have_no_probe() -> None:
    assert intra_node_target(Topology(4, 1)) is None
    assert inter_node_target(Topology(4, 4)) is None
    assert inter_node_target(Topology(1, 1)) is None and intra_node_target(Topology(1, 1)) is None


def test_degree_bandwidth_is_the_slower_measured_link() -> None:
    assert LinkBandwidth(intra=5e10, inter=2e9).degree_bandwidth == 2e9
    assert LinkBandwidth(intra=5e10).degree_bandwidth == 5e10
    assert LinkBandwidth(inter=3e9).degree_bandwidth == 3e9
    assert LinkBandwidth().degree_bandwidth == 0.0 and math.isinf(LinkBandwidth().intra)
