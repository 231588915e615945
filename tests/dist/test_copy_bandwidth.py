"""The bandwidth probe on 4 gloo ranks ([Note: copies per link] in fssdp/copy_bandwidth.py): one
figure per kind of link that the topology has (2 nodes x 2: both; 4 x 1: the NIC only; 1 x 4:
device links only), the same on every rank, measured also where some ranks own no expert
(E < W); and `parallel=fssdp` in predict mode on 2 simulated nodes budgets its copies with the
slower link's figure and says both on its topology line."""

from __future__ import annotations

import math
from typing import Any

import torch

from tests.support.harness import run_distributed
from tests.support.parity import train_capture

LAYOUTS = [(2, 6), (1, 6), (4, 6), (2, 2)]  # (ranks per node, experts) at world 4


def _probe_job(rank: int, world: int) -> list[tuple[float, float]]:
    from collectives.placement import Placement, Topology
    from fssdp.copy_bandwidth import probe_links
    from fssdp.sharding import balanced_uniform_sharding

    out = []
    for rpn, E in LAYOUTS:
        topo = Topology(world, rpn)
        own = Placement.from_owners(balanced_uniform_sharding({"b": E}, topo)["b"], world)
        rows = torch.randn(len(own.owned(rank)), 4096)
        links = probe_links(rows, own, topo, None, "auto", 60.0)
        out.append((links.intra, links.inter))
    return out


def test_probe_measures_each_kind_of_link_the_topology_has() -> None:
    per_rank = run_distributed(_probe_job, 4)
    assert all(r == per_rank[0] for r in per_rank), per_rank  # agreed: MIN over ranks
    for (rpn, E), (intra, inter) in zip(LAYOUTS, per_rank[0]):
        nodes = 4 // rpn
        assert math.isinf(intra) == (rpn == 1), (rpn, E, intra)
        assert math.isinf(inter) == (nodes == 1), (rpn, E, inter)
        for v in (intra, inter):  # a figure, not the floor of a rank that received nothing
            assert math.isinf(v) or v > 1e3, (rpn, E, intra, inter)


def _links(trainer: Any) -> dict[str, Any]:
    from launch.train import topology_line

    par = trainer.par
    return {
        "links": (par.links.intra, par.links.inter),
        "policies": [p.bandwidth for p in par.policies.values()],
        "line": topology_line(par, None),
    }


def test_predict_mode_budgets_copies_with_the_slower_link() -> None:
    args = ["model=gpt_moe_tiny", "model.n_layers=2", "data=synthetic", "parallel=fssdp",
            "parallel.plan_mode=predict", "parallel.ranks_per_node=2"]  # fmt: skip
    got = run_distributed(train_capture, 4, args, 1, _links)
    probes = [g["probe"] for g in got]
    intra, inter = probes[0]["links"]
    assert all(p["links"] == (intra, inter) for p in probes), probes
    assert math.isfinite(intra) and math.isfinite(inter) and min(intra, inter) > 1e3, probes
    assert probes[0]["policies"] and all(b == min(intra, inter) for b in probes[0]["policies"])
    line = probes[0]["line"]
    assert "topology: 2 nodes x 2 ranks per node" in line and "intra-node" in line, line
    assert "inter-node" in line, line
