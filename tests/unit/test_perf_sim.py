"""The simulator's cost model and systems (perf/cost_model.py, perf/sim_systems.py, sim_run.py)."""

from __future__ import annotations

import pytest

from launch.routing_trace import RoutingTrace
from perf.cost_model import Cluster, Workload, even_sources, expert_s, scale_rows, transfer_s
from perf.sim_run import simulate, summary
from perf.sim_systems import EPSim, FSSDPSim

GB = 1e9


def cluster(nodes: int = 1, per_node: int = 4, **kw: float) -> Cluster:
    base = dict(flops=1e12, expert_flops=1e12, intra_bw=10 * GB, inter_bw=1 * GB)
    base.update(kw)
    return Cluster("t", nodes, per_node, **base)  # type: ignore[arg-type]


def workload(world: int = 4, experts: int = 8) -> Workload:
    return Workload(
        d_model=64,
        n_layers=2,
        seq_len=32,
        tokens_per_rank=128,
        num_experts=experts,
        top_k=2,
        expert_hidden=128,
        vocab=256,
    )


def test_transfer_time_is_the_busiest_link() -> None:
    c = cluster(nodes=2, per_node=2)
    m = [[0.0] * 4 for _ in range(4)]
    m[0][1] = 10 * GB  # intra-node: 1 s at 10 GB/s
    assert transfer_s(m, c) == pytest.approx(1.0)
    m[0][2] = 2 * GB  # inter-node: node 0's NIC sends 2 GB at 1 GB/s
    m[1][3] = 1 * GB  # same NIC, another device: the NIC is shared
    assert transfer_s(m, c) == pytest.approx(3.0)
    m2 = [[5 * GB if s == r else 0.0 for r in range(4)] for s in range(4)]
    assert transfer_s(m2, c) == 0.0  # to itself: free


def test_even_sources_and_scale_rows_keep_totals() -> None:
    rows = scale_rows([5.0, 3.0, 0.0, 2.0], 101)
    assert sum(rows) == 101 and rows[2] == 0 and rows[0] > rows[1] > rows[3]
    src = even_sources([10, 3, 0, 7], 4)
    assert [sum(col) for col in zip(*src)] == [10, 3, 0, 7]
    assert max(max(r) - min(r) for r in zip(*src)) <= 1  # split evenly over sources


def test_ep_hot_expert_owner_is_the_straggler() -> None:
    w, c = workload(), cluster()
    skewed = [w.rows_per_rank * 4] + [0] * 7  # every row to expert 0 (owned by rank 0)
    cost = EPSim(w, c).layer("b", skewed)
    assert cost.rows_max == 4 * w.rows_per_rank
    assert cost.expert_s == pytest.approx(expert_s(4 * w.rows_per_rank, w, c))
    # ranks 1..3 each send their quarter of the rows to rank 0: 4 all-to-alls of 3/4 of them
    rank0_in = 3 * w.rows_per_rank * w.d_model * w.act_bytes
    assert cost.a2a_s == pytest.approx(4 * rank0_in / c.intra_bw)


def test_fssdp_replicas_balance_rows_and_cost_transfers() -> None:
    w, c = workload(), cluster(intra_bw=1e15)  # fast links: the overlap degree allows t >= m
    skewed = [w.rows_per_rank * 2, w.rows_per_rank * 2] + [0] * 6
    sim = FSSDPSim(w, c, memory_cap=2, mode="predict")
    first = sim.layer("b", skewed)  # step 1: nothing planned yet, owners only
    second = sim.layer("b", skewed)  # planned from step 1's load
    assert first.rows_max == 4 * w.rows_per_rank  # rank 0 owns experts 0 and 1
    assert second.rows_max == w.rows_per_rank  # every rank holds experts 0 and 1
    assert second.bytes["spag"] == 6 * w.expert_params * w.param_bytes
    ep = EPSim(w, c).layer("b", skewed)
    assert second.expert_s < ep.expert_s
    slow = FSSDPSim(w, cluster(intra_bw=1e3), memory_cap=2, mode="predict")  # no copy fits
    slow.layer("b", skewed)
    assert slow.layer("b", skewed).rows_max == 4 * w.rows_per_rank
    # exact (the runtime's default) plans with this step's counts: balanced from step 1, with
    # the 3 copies it takes to move 3 ranks' worth of rows off rank 0 (predict sent 6).
    exact = FSSDPSim(w, c, memory_cap=2).layer("b", skewed)
    assert exact.rows_max == w.rows_per_rank
    assert exact.bytes["spag"] == 3 * w.expert_params * w.param_bytes
    # the planner's and dispatcher's measured time is on the critical path
    assert exact.plan_s > 0 and exact.total_s == pytest.approx(
        exact.dense_s + exact.expert_s + exact.a2a_s + exact.exposed_s + exact.plan_s
    )


def test_simulate_trace_and_summary() -> None:
    w, c = workload(), cluster()
    trace = RoutingTrace(
        {"banks": {"b0": {"num_experts": 8}}},
        [{"b0": [400, 200, 100, 50, 10, 10, 10, 10]} for _ in range(4)],
    )
    ep = summary(simulate("ep", trace, w, c), warmup=1)
    fs = summary(simulate("fssdp", trace, w, c), warmup=1)
    fsdp = summary(simulate("fsdp", trace, w, c), warmup=1)
    assert fs["rows_max_over_mean"] < ep["rows_max_over_mean"]
    assert fs["plan_s"] > 0 and ep["plan_s"] == 0.0 and "step_s_without_plan" not in fs
    assert fsdp["a2a_s"] == 0.0 and fsdp["rows_max_over_mean"] == 1.0
    assert ep["step_s"] == pytest.approx(
        ep["dense_s"]
        + ep["expert_s"]
        + ep["a2a_s"]
        + ep["exposed_s"]
        + ep["plan_s"]
        + 3 * 2 * w.tokens_per_rank * w.d_model * w.vocab / c.flops
    )
    with pytest.raises(ValueError, match="unknown system"):
        simulate("nope", trace, w, c)


def test_more_ranks_than_experts_run_in_groups() -> None:
    w = workload(experts=8)
    trace = RoutingTrace({}, [{"b0": [1] * 8} for _ in range(2)])
    c16 = Cluster("t", 2, 8, 1e12, 1e12, 10 * GB, 1 * GB)
    res = simulate("ep", trace, w, c16)
    assert all(x.rows_mean == w.rows_per_rank for r in res for x in r.layers)


def test_spag_priced_as_the_cheaper_schedule_and_the_tree_crosses_nodes_once() -> None:
    from collectives.placement import Placement
    from collectives.schedule import Diff, direct_from
    from perf.sim_spag import broadcast_s, rounds_s, spag_s

    c = cluster(nodes=2, per_node=4, latency_s=0.0)  # NIC 1 GB/s, device links 10 GB/s
    own = Placement.from_owners([0, 4], 8)
    to_node1 = own.with_replicas({0: [4, 5, 6, 7]})  # expert 0 to every rank of node 1
    direct = rounds_s(direct_from(Diff.of(own, to_node1)), GB, c)
    assert direct == pytest.approx(4.0)  # four copies through node 0's NIC
    (tree,) = spag_s(own, to_node1, c, GB)
    assert tree < direct and tree == pytest.approx(1.0 + 2 * 0.1)  # one NIC copy, fan-out
    same_node = own.with_replicas({0: [1]})
    assert spag_s(own, same_node, c, GB) == [pytest.approx(0.1)]  # one device-link copy
    assert spag_s(own, own, c, GB, GB) == [0.0, 0.0]
    # FasterMoE's shadows: pipelined broadcasts, each expert over the NIC once
    assert broadcast_s(3, c, GB) == pytest.approx(3.0)
    assert broadcast_s(3, cluster(nodes=1, per_node=4), GB) == pytest.approx(0.3)


def test_a_spag_behind_other_work_exposes_only_what_exceeds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[Note: overlapped rounds]: the tree above (one NIC copy, then two device-link rounds,
    1.2 s) runs all its rounds behind the work it was issued before, plus the hand-off to the
    worker thread (set to 0.05 s here); the direct schedule (four NIC copies, 4 s) is never the
    cheaper one here. A spAG that moves nothing costs nothing, not even the hand-off."""
    import perf.sim_spag as sim_spag
    from collectives.placement import Placement

    monkeypatch.setattr(sim_spag, "handoff_s", lambda: 0.05)
    c = cluster(nodes=2, per_node=4, latency_s=0.0)  # NIC 1 GB/s, device links 10 GB/s
    own = Placement.from_owners([0, 4], 8)
    to_node1 = own.with_replicas({0: [4, 5, 6, 7]})
    jobs = [(GB, 0.0), (GB, 0.5), (GB, 1.1), (GB, 1.5)]
    got = sim_spag.spag_exposed_s(own, to_node1, c, jobs)
    assert got == [pytest.approx(1.25), pytest.approx(0.75), pytest.approx(0.15), 0.0]
    assert sim_spag.spag_exposed_s(own, own, c, [(GB, 0.0)]) == [0.0]


def test_fastermoe_shadows_capped_at_fssdps_memory_unless_unbounded() -> None:
    from perf.sim_systems import FasterMoESim

    w, c = workload(), cluster(intra_bw=1e15)  # copies are free: both hot experts pay
    skewed = [4 * w.rows_per_rank] * 2 + [0] * 6  # rank 0 owns both hot experts
    one = FasterMoESim(w, c, max_shadows=1).layer("b", skewed)
    default = FasterMoESim(w, c).layer("b", skewed)  # fssdp's m = 2
    free = FasterMoESim(w, c, max_shadows=None).layer("b", skewed)
    copy = 3 * w.expert_params * w.param_bytes  # one expert to the 3 other ranks
    assert one.bytes["spag"] == copy and default.bytes["spag"] == free.bytes["spag"] == 2 * copy
    assert free.rows_max == 2 * w.rows_per_rank < one.rows_max


def test_fssdp_sim_keeps_rows_in_the_node_with_node_local_replicas() -> None:
    """Even load (EP is balanced, balancing adds nothing) whose rows come from both nodes: the
    node-local replicas keep rows off the NIC when they save more bytes than the copies."""
    w = workload(experts=8)
    c = cluster(nodes=2, per_node=2, intra_bw=1e15, inter_bw=1 * GB)
    even = [4096] * 8
    local = FSSDPSim(w, c, memory_cap=2).layer("b", even)
    plain = FSSDPSim(w, c, memory_cap=2, node_local=False).layer("b", even)
    assert "spag" not in plain.bytes and local.bytes["spag"] > 0
    assert local.a2a_s < 0.75 * plain.a2a_s
    assert local.rows_max <= 1.1 * plain.rows_max


def _transfer_reference(m: list[list[float]], c: Cluster) -> float:
    """The link model written out link by link (what transfer_s computes with tensors)."""
    W = len(m)
    intra_out, intra_in = [0.0] * W, [0.0] * W
    inter_out, inter_in = [0.0] * c.nodes, [0.0] * c.nodes
    for s, row in enumerate(m):
        for r, b in enumerate(row):
            if s == r:
                continue
            if c.node_of(s) == c.node_of(r):
                intra_out[s] += b
                intra_in[r] += b
            else:
                inter_out[c.node_of(s)] += b
                inter_in[c.node_of(r)] += b
    t = max(max(intra_out), max(intra_in)) / c.intra_bw
    if c.nodes > 1:
        t = max(t, max(max(inter_out), max(inter_in)) / c.inter_bw)
    return t + (c.latency_s if t > 0 else 0.0)


@pytest.mark.parametrize("nodes,per_node", [(1, 4), (3, 4), (4, 1), (2, 8)])
def test_transfer_time_matches_the_link_by_link_model(nodes: int, per_node: int) -> None:
    import torch

    c = cluster(nodes=nodes, per_node=per_node)
    g = torch.Generator().manual_seed(nodes * 10 + per_node)
    m = (torch.rand(c.world, c.world, generator=g, dtype=torch.float64) * GB).tolist()
    m[0][c.world - 1] = 7 * GB  # one hot link
    got = transfer_s(torch.tensor(m, dtype=torch.float64), c)
    assert got == pytest.approx(_transfer_reference(m, c), rel=1e-12)
    with pytest.raises(ValueError, match="bytes matrix"):
        transfer_s(torch.zeros(c.world + 1, c.world + 1), c)
