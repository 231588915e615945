"""sparse_all_gather / sparse_reduce_scatter on 1-4 gloo ranks against dense references.

Legend: E experts, S elements per expert, W ranks; `full_ES` a dense [E, S] reference.
Each world size is one spawn running every case (spawning costs ~2 s per rank).
"""

from __future__ import annotations

import random
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from collectives import (
    CollectiveError,
    CommStats,
    CostModel,
    Placement,
    SparseHandle,
    Topology,
    probe_cost_model,
    sparse_all_gather,
    sparse_reduce_scatter,
)
from collectives.comm import guarded
from collectives.dispatch import all_to_all_rows
from tests.support.harness import run_distributed

DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def make_cases(W: int) -> list[tuple[str, Placement, Placement]]:
    """(name, P_from, P_to) pairs, identical on every rank (seeded)."""
    rng = random.Random(1234 + W)
    cases = []
    for i, lam in enumerate((0.0, 0.2, 0.5, 0.9)):
        E = rng.randint(1, 9)
        p0 = Placement.from_owners([rng.randrange(W) for _ in range(E)], W)
        reps = {e: [r for r in range(W) if rng.random() < lam] for e in range(E)}
        cases.append((f"random{i}-lam{lam}", p0, p0.with_replicas(reps)))
    E = 6
    inter = Placement.from_owners([(3 * e + 1) % W for e in range(E)], W)  # non-contiguous
    cases.append(("one-expert-to-all", inter, inter.with_replicas({2: range(W)})))
    cases.append(("two-hot-experts", inter, inter.with_replicas({0: range(W), 5: range(W)})))
    one = Placement.from_owners([W - 1] * 5, W)
    cases.append(
        ("one-rank-owns-all", one, one.with_replicas({e: range(e % W + 1) for e in range(5)}))
    )
    cases.append(("non-contiguous", inter, inter.with_replicas({e: [e % W] for e in range(E)})))
    cases.append(("only-rank0-receives", inter, inter.with_replicas({e: [0] for e in range(E)})))
    cases.append(("empty-diff", inter, inter))
    rep = inter.with_replicas({1: [0, W - 1]})
    cases.append(("empty-diff-with-replicas", rep, rep))
    cases.append(("incremental", rep, rep.with_replicas({1: range(W), 3: [0]})))
    few = Placement.from_owners([0, 0], W)  # fewer experts than ranks: most own nothing
    cases.append(("few-experts", few, few.with_replicas({1: range(W)})))
    cases.append(("no-experts", Placement.from_owners([], W), Placement.from_owners([], W)))
    return cases


def _rows(rank: int, ids: list[int], S: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-(rank, expert) data; integer-valued for float64/bf16 so sums are exact."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if dtype == torch.float32:
        return torch.randn(len(ids), S, generator=g, dtype=dtype)
    return torch.randint(-8, 9, (len(ids), S), generator=g).to(dtype)


def _dense(rows: torch.Tensor, ids: list[int], E: int) -> torch.Tensor:
    full_ES = torch.zeros(E, rows.shape[1], dtype=torch.float64)
    full_ES[ids] = rows.double()
    return full_ES


def variants(dtype: torch.dtype) -> list[tuple[str, bool]]:
    """(algorithm, async_op) runs per dtype; float64 covers async and the cost rule as well."""
    base = [("a2a", False), ("tree", False), ("tree_nodes", False)]
    more = [("a2a", True), ("tree", True), ("tree_nodes", True), ("auto", False)]
    return base + more if dtype == torch.float64 else base


def _run(fn, *args, algo: str, async_op: bool, **kw) -> tuple[torch.Tensor, CommStats]:
    # Zero latencies make "auto" pick by bytes alone, so it exercises both choices here.
    kw.update(algorithm=algo, cost_model=CostModel(0.0, 0.0))
    if async_op:
        h = fn(*args, async_op=True, **kw)
        assert isinstance(h, SparseHandle)
        return h.wait(), h.stats
    return fn(*args, **kw)


class StatsCheck:
    """Per-rank byte checks now; totals over ranks with one all_reduce at the end."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.names: list[str] = []

    def add(
        self,
        st: CommStats,
        sent: int,
        recv: int,
        per_rank_sent: bool,
        per_rank_recv: bool,
        what: str,
    ) -> None:
        if per_rank_recv:
            assert st.bytes_recv == recv, f"{what}: recv {st.bytes_recv} != {recv}"
        if per_rank_sent:
            assert st.bytes_sent == sent, f"{what}: sent {st.bytes_sent} != {sent}"
        self.rows.append([st.bytes_sent, st.bytes_recv, sent])
        self.names.append(what)

    def check_totals(self) -> None:
        t = torch.tensor(self.rows, dtype=torch.int64).reshape(-1, 3)
        dist.all_reduce(t)
        for (s, r, want), what in zip(t.tolist(), self.names):
            assert s == r == want, f"{what}: totals sent {s} recv {r} analytic {want}"


def check_gather(rank: int, W: int, name: str, pf: Placement, pt: Placement, seed: int) -> None:
    S = 7 + seed % 5
    stats = StatsCheck()
    for dtype in DTYPES:
        x = _rows(rank, pf.owned(rank), S, seed, dtype)
        full = [torch.zeros(len(pf.owner), S, dtype=torch.float64) for _ in range(W)]
        dist.all_gather(full, _dense(x, pf.owned(rank), pf.num_experts))
        ref_ES = sum(full) if W > 1 else full[0]
        # Replicas already in P_from hold the owner's values (they were gathered earlier).
        x_in = ref_ES[pf.held(rank)].to(dtype)
        expect = ref_ES[pt.held(rank)].to(dtype)
        new = pt.extra_pairs(pf)
        row = S * x_in.element_size()
        sent = sum(1 for e, _ in new if pt.owner[e] == rank) * row
        recv = sum(1 for _, r in new if r == rank) * row
        for algo, async_op in variants(dtype):
            what = f"spAG {name} {dtype} {algo} async={async_op}"
            out, st = _run(
                sparse_all_gather,
                x_in,
                pf,
                pt,
                algo=algo,
                async_op=async_op,
                phase=f"test {name}",
                topology=Topology(W, 1 if W % 2 else 2),
            )
            assert out.dtype == dtype and out.shape == (len(pt.held(rank)), S), what
            assert torch.equal(out, expect), what
            # Every new holder receives once; in a tree, relays send on the owner's behalf.
            stats.add(st, sent, recv, algo == "a2a", True, what)
        for algo in ("a2a", "tree"):  # into a caller's buffer, stale contents overwritten
            buf = torch.full_like(expect, 99.0)
            out, _ = sparse_all_gather(x_in, pf, pt, algorithm=algo, out=buf)
            assert out is buf and torch.equal(buf, expect), f"spAG {name} {dtype} out= {algo}"
    stats.check_totals()


def check_reduce(rank: int, W: int, name: str, pf: Placement, pt: Placement, seed: int) -> None:
    p0 = pt.ownership()  # spRS goes from the materialized placement back to ownership
    S = 5 + seed % 3
    stats = StatsCheck()
    for dtype in DTYPES:
        held, owned = pt.held(rank), p0.owned(rank)
        g = _rows(rank, held, S, seed + 77, dtype)
        # Dense references: all_reduce (exact for integer-valued data) and a rank-ordered sum.
        dense = _dense(g, held, pt.num_experts)
        summed = dense.clone()
        dist.all_reduce(summed)
        gathered = [torch.zeros_like(dense) for _ in range(W)]
        dist.all_gather(gathered, dense)
        ordered = torch.zeros(len(owned), S, dtype=dtype)
        for i, e in enumerate(owned):
            parts = [gathered[h][e].to(dtype) for h in sorted(pt.holders[e])]
            acc = parts[0]
            for p in parts[1:]:
                acc = acc + p
            ordered[i] = acc
        extra = pt.extra_pairs(p0)
        row = S * g.element_size()
        sent = sum(1 for _, r in extra if r == rank) * row
        recv = sum(1 for e, _ in extra if pt.owner[e] == rank) * row
        results: dict[str, torch.Tensor] = {}
        for algo, async_op in variants(dtype):
            what = f"spRS {name} {dtype} {algo} async={async_op}"
            out, st = _run(
                sparse_reduce_scatter,
                g,
                pt,
                p0,
                algo=algo,
                async_op=async_op,
                phase=f"test {name}",
            )
            assert out.shape == (len(owned), S) and out.dtype == dtype, what
            if dtype == torch.float32:
                torch.testing.assert_close(out.double(), summed[owned], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(out.double(), summed[owned]), what
            if algo == "a2a":
                assert torch.equal(out, ordered), f"{what}: not summed in rank order"
            if algo in results:
                assert torch.equal(out, results[algo]), f"{what}: not deterministic"
            results[algo] = out
            # Each non-owner holder sends once; in a tree, relays receive on the owner's behalf.
            stats.add(st, sent, recv, True, algo == "a2a", what)
        for algo in ("a2a", "tree"):  # into a caller's buffer, stale contents overwritten
            buf = torch.full((len(owned), S), 99.0, dtype=dtype)
            out, _ = sparse_reduce_scatter(g, pt, p0, algorithm=algo, out=buf)
            assert out is buf and torch.equal(buf, results[algo]), f"spRS {name} out= {algo}"
        assert torch.equal(g, _rows(rank, held, S, seed + 77, dtype)), "input was modified"
    stats.check_totals()


def worker_sparse(rank: int, W: int) -> int:
    n = 0
    for seed, (name, pf, pt) in enumerate(make_cases(W)):
        check_gather(rank, W, name, pf, pt, seed)
        check_reduce(rank, W, name, pf, pt, seed)
        n += 1
    model, raw = probe_cost_model(reps=2, big_bytes=1 << 16)
    models: list[object] = [None] * W
    dist.all_gather_object(models, model)
    assert all(m == model for m in models), "ranks must agree on the cost model"
    assert W == 1 or (model.a2a_peer_bytes > 0 and model.round_bytes > 0 and raw), raw
    if W == 2:
        check_timeouts(rank)
    return n


def check_timeouts(rank: int) -> None:
    """Rank 1 never joins: rank 0 must fail within the timeout (the call's, else the group's)
    with rank, op and phase named; dispatch's exchange too."""
    g = dist.new_group([0, 1])
    g_short = dist.new_group([0, 1], timeout=timedelta(seconds=1))
    p0 = Placement.from_owners([1], 2)
    pt = p0.with_replicas({0: [0]})
    if rank == 1:
        time.sleep(4.0)
        return
    x = torch.zeros(0, 4)
    phase = "spag/bank 'layers.2.moe'"
    calls = [
        (
            "sparse_all_gather",
            0.5,
            lambda: sparse_all_gather(
                x, p0, pt, group=g, algorithm="a2a", timeout_s=0.5, phase=phase
            ),
        ),
        (
            "sparse_all_gather",
            0.5,
            lambda: sparse_all_gather(
                x, p0, pt, group=g, algorithm="tree", timeout_s=0.5, phase=phase
            ),
        ),
        (
            "sparse_reduce_scatter",
            1,
            lambda: sparse_reduce_scatter(
                torch.zeros(1, 4), pt, p0, group=g_short, algorithm="a2a", phase=phase
            ),
        ),
        (
            "all_to_all_rows",
            0.5,
            lambda: all_to_all_rows(
                torch.zeros(1, 2), [0, 1], [0, 0], group=g, timeout_s=0.5, phase=phase
            ),
        ),
    ]
    for op, limit, call in calls:
        t0 = time.monotonic()
        with pytest.raises(CollectiveError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"rank 0: {op} timed out after {limit:g}s (phase {phase})"), msg
        assert time.monotonic() - t0 < limit + 1.0, msg


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sparse_collectives(world: int) -> None:
    counts = run_distributed(worker_sparse, world, timeout_s=90)
    assert counts == [len(make_cases(world))] * world


def test_world1_without_process_group() -> None:
    assert not dist.is_initialized()
    p0 = Placement.from_owners([0, 0, 0], 1)
    x = torch.arange(6.0).reshape(3, 2)
    out, st = sparse_all_gather(x, p0, p0)
    assert torch.equal(out, x) and st == CommStats(0, 0) and out.data_ptr() != x.data_ptr()
    red, st = sparse_reduce_scatter(x, p0, p0, async_op=False)
    assert torch.equal(red, x) and st == CommStats(0, 0)
    with pytest.raises(ValueError, match=r"expects input \[3, S\]"):
        sparse_all_gather(x[:2], p0, p0)
    with pytest.raises(ValueError, match="placement world_size 2 != group size 1"):
        sparse_all_gather(
            x, Placement.from_owners([0, 0, 0], 2), Placement.from_owners([0, 0, 0], 2)
        )


def test_guarded_wraps_backend_errors() -> None:
    def boom() -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(CollectiveError, match=r"^rank 0: spRS failed \(phase sprs/x\): Runtime"):
        guarded(boom, "spRS", "sprs/x")
