"""The runtime's modes on 1-4 gloo ranks against dense references: spAG from a row source into the
new rows only (new_only), spRS of replica gradients only (replicas_only, accumulate), an
algorithm chosen once and reused, and a third algorithm registered here.

Legend: E experts, S elements per expert, W ranks; `ref_ES` a dense [E, S] reference; on a rank,
N new rows, P replica rows, O owned rows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

from collectives import (
    Algorithm,
    CostModel,
    Placement,
    SparseHandle,
    choose,
    register,
    sparse_all_gather,
    sparse_reduce_scatter,
    unregister,
)
from collectives.algorithms import Finish
from collectives.algorithms.a2a import fold_in_rank_order
from collectives.comm import Call, issue_a2a
from collectives.rows import GatherRows, ReduceRows
from collectives.schedule import Diff, Schedule, direct_from
from tests.dist.test_collectives import DTYPES, StatsCheck, _dense, _rows, make_cases
from tests.support.harness import run_distributed

FREE = CostModel(0.0, 0.0)  # "auto" picks by bytes alone


def mode_cases(W: int) -> list[tuple[str, Placement, Placement]]:
    """test_collectives' cases plus Zipf-skewed replicas and one owner of all to every rank."""
    rng = random.Random(99 + W)
    E = 8
    p0 = Placement.from_owners([rng.randrange(W) for _ in range(E)], W)
    hot = [1.0 / (e + 1) ** 1.2 for e in range(E)]
    reps: dict[int, list[int]] = {}
    for r in range(W):
        for e in set(rng.choices(range(E), weights=hot, k=2)):
            reps.setdefault(e, []).append(r)
    one = Placement.from_owners([0] * 4, W)
    return make_cases(W) + [
        ("zipf-two-per-rank", p0, p0.with_replicas(reps)),
        ("one-owner-to-all", one, one.with_replicas({e: range(W) for e in range(4)})),
    ]


def variants(dtype: torch.dtype) -> list[tuple[str, bool]]:
    base = [("a2a", False), ("tree", False)]
    return (
        base + [("a2a", True), ("tree", True), ("auto", False)] if dtype == torch.float64 else base
    )


def call(
    fn: Callable[..., Any],
    *args: Any,
    async_op: bool,
    before_wait: Callable[[], None] = lambda: None,
    **kw: Any,
) -> tuple[torch.Tensor, Any]:
    """Run sync or async; `before_wait` runs between issue and wait (async)."""
    if not async_op:
        return fn(*args, cost_model=FREE, **kw)
    h = fn(*args, async_op=True, cost_model=FREE, **kw)
    assert isinstance(h, SparseHandle)
    before_wait()
    return h.wait(), h.stats


def dense_owned_rows(
    rank: int, W: int, pf: Placement, S: int, seed: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's input rows following pf.held(rank), dense [E, S] reference of the owners')."""
    x = _rows(rank, pf.owned(rank), S, seed, dtype)
    full = [torch.zeros(pf.num_experts, S, dtype=torch.float64) for _ in range(W)]
    dist.all_gather(full, _dense(x, pf.owned(rank), pf.num_experts))
    ref_ES = sum(full) if W > 1 else full[0]
    return ref_ES[pf.held(rank)].to(dtype), ref_ES


class RecordingSource:
    """A callable row source over rows following `ids`, recording each call's ids."""

    def __init__(self, x_XS: torch.Tensor, ids: list[int]) -> None:
        self.x_XS, self.row = x_XS, {e: i for i, e in enumerate(ids)}
        self.calls: list[list[int]] = []

    def __call__(self, ids: list[int]) -> torch.Tensor:
        self.calls.append(list(ids))
        return self.x_XS[[self.row[e] for e in ids]]


def assert_equal(got: object, want: object, what: str) -> None:
    assert got == want, f"{what}: {got} != {want}"


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Exact for integer-valued data (float64, bf16), to round-off for float32."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got.double(), want.double()), what


def check_gather_modes(
    rank: int, W: int, name: str, pf: Placement, pt: Placement, seed: int
) -> None:
    S = 6 + seed % 4
    stats = StatsCheck()
    held_from = pf.held(rank)
    new_ids = [e for e in pt.held(rank) if e not in held_from]
    # An owner sends its experts that gain holders (in a tree, relays forward the rest).
    sends = sorted(e for e in pf.owned(rank) if pt.holders[e] - pf.holders[e])
    for dtype in DTYPES:
        x_in, ref_ES = dense_owned_rows(rank, W, pf, S, seed, dtype)
        expect_NS = ref_ES[new_ids].to(dtype)
        row = S * x_in.element_size()
        sent = sum(len(pt.holders[e] - pf.holders[e]) for e in pf.owned(rank)) * row
        source = RecordingSource(x_in, held_from)
        calls = source.calls
        for algo, async_op in variants(dtype):
            for kind in ("tensor", "callable"):
                what = f"spAG new_only {name} {dtype} {algo} async={async_op} {kind}"
                calls.clear()
                buf = torch.full((len(new_ids), S), 99.0, dtype=dtype)  # stale contents
                want = [sends] if sends and kind == "callable" else []
                called_at_issue = partial(assert_equal, calls, want, what)
                out, st = call(
                    sparse_all_gather,
                    x_in if kind == "tensor" else source,
                    pf,
                    pt,
                    async_op=async_op,
                    before_wait=called_at_issue,
                    algorithm=algo,
                    new_only=True,
                    out=buf,
                    phase=f"test {name}",
                )
                assert out is buf and torch.equal(out, expect_NS), what
                called_at_issue()
                stats.add(st, sent, len(new_ids) * row, algo == "a2a", True, what)
        for algo in ("a2a", "tree"):  # the full output from a callable; new_only with no out
            calls.clear()
            full = torch.full((len(pt.held(rank)), S), 7.0, dtype=dtype)
            out, _ = sparse_all_gather(source, pf, pt, algorithm=algo, out=full)
            assert torch.equal(full, ref_ES[pt.held(rank)].to(dtype)), f"{name} full {algo}"
            assert calls == ([held_from] if held_from else []), f"{name} full {algo}"
            out, _ = sparse_all_gather(x_in, pf, pt, algorithm=algo, new_only=True)
            assert out.shape == (len(new_ids), S) and torch.equal(out, expect_NS)
    stats.check_totals()


def check_reduce_modes(rank: int, W: int, name: str, pt: Placement, seed: int) -> None:
    p0 = pt.ownership()
    S = 5 + seed % 3
    stats = StatsCheck()
    held, owned = pt.held(rank), p0.owned(rank)
    reps = [e for e in held if e not in owned]
    n_recv = sum(len(pt.holders[e]) - 1 for e in owned)
    for dtype in DTYPES:
        g_HS = _rows(rank, held, S, seed + 77, dtype)  # this rank's copy of each held expert
        g_PS = g_HS[[held.index(e) for e in reps]]
        g_zero = g_HS.clone()  # the old way: owners' rows zeroed, all holders' rows sent
        g_zero[[held.index(e) for e in owned]] = 0
        base_OS = _rows(rank + 100, owned, S, seed, dtype)  # what .grad holds
        dense = _dense(g_PS, reps, pt.num_experts)
        summed = dense.clone()
        dist.all_reduce(summed)  # exact for integer-valued data
        gathered = [torch.zeros_like(dense) for _ in range(W)]
        dist.all_gather(gathered, dense)
        ordered = torch.zeros(len(owned), S, dtype=dtype)  # other holders in rank order
        folded = base_OS.clone()  # .grad + the same, left to right
        for i, e in enumerate(owned):
            parts = [gathered[h][e].to(dtype) for h in sorted(pt.holders[e] - {rank})]
            for j, p in enumerate(parts):
                ordered[i] = p if j == 0 else ordered[i] + p
                folded[i] = folded[i] + p
        row = S * g_PS.element_size()

        first: dict[str, torch.Tensor] = {}
        for algo, async_op in variants(dtype):
            what = f"spRS replicas_only {name} {dtype} {algo} async={async_op}"
            buf = torch.full((len(owned), S), 99.0, dtype=dtype)
            out, st = call(
                sparse_reduce_scatter,
                g_PS,
                pt,
                p0,
                async_op=async_op,
                algorithm=algo,
                replicas_only=True,
                out=buf,
                phase=f"test {name}",
            )
            assert out is buf and out.shape == (len(owned), S), what
            close(out, summed[owned], what)
            old, _ = sparse_reduce_scatter(g_zero, pt, p0, algorithm=algo, cost_model=FREE)
            assert torch.equal(out, old), f"{what}: differs from the zero-rows way"
            if algo == "a2a":
                assert torch.equal(out, ordered), f"{what}: not summed in rank order"
            if algo in first:
                assert torch.equal(out, first[algo]), f"{what}: not deterministic"
            first[algo] = out.clone()
            stats.add(st, len(reps) * row, n_recv * row, True, algo == "a2a", what)
            grad = base_OS.clone()
            out, st = call(
                sparse_reduce_scatter,
                g_PS,
                pt,
                p0,
                async_op=async_op,
                algorithm=algo,
                replicas_only=True,
                out=grad,
                accumulate=True,
            )
            assert out is grad, what
            close(grad, base_OS.double() + summed[owned], f"{what} accumulate")
            if algo == "a2a":
                assert torch.equal(grad, folded), f"{what} accumulate: not folded in rank order"
        again_PS = _rows(rank, held, S, seed + 77, dtype)[[held.index(e) for e in reps]]
        assert torch.equal(g_PS, again_PS), "input was modified"
    stats.check_totals()


def check_chosen_once(rank: int, pt: Placement) -> None:
    """One `choose` serves the spAG and the spRS of a step (schedule reused, same results)."""
    S, p0 = 4, pt.ownership()
    x = torch.randn(len(p0.held(rank)), S, generator=torch.Generator().manual_seed(rank))
    g = torch.randn(len(pt.held(rank)), S, generator=torch.Generator().manual_seed(9 + rank))
    for name in ("a2a", "tree"):
        algo = choose(p0, pt, expert_bytes=S * 4, algorithm=name)
        got, st = sparse_all_gather(x, p0, pt, algorithm=algo)
        want, st_want = sparse_all_gather(x, p0, pt, algorithm=name)
        assert torch.equal(got, want) and st == st_want, name
        red, st = sparse_reduce_scatter(g, pt, p0, algorithm=algo)
        red_want, st_want = sparse_reduce_scatter(g, pt, p0, algorithm=name)
        assert torch.equal(red, red_want) and st == st_want, name


def worker_modes(rank: int, W: int) -> int:
    n = 0
    for seed, (name, pf, pt) in enumerate(mode_cases(W)):
        check_gather_modes(rank, W, name, pf, pt, seed)
        check_reduce_modes(rank, W, name, pt, seed)
        check_chosen_once(rank, pt)
        n += 1
    return n


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_new_modes(world: int) -> None:
    counts = run_distributed(worker_modes, world, timeout_s=120)
    assert counts == [len(mode_cases(world))] * world


# -- a third algorithm, registered by this module ------------------------------------------------


class PerExpertA2A(Algorithm):
    """One all_to_all_single per moved expert: round k carries the k-th expert's copies (every
    rank joins every round). Priced below everything so that 'auto' must pick it."""

    name = "per_expert_test"
    issued: ClassVar[dict[str, int]] = {"gather": 0, "reduce": 0}

    @classmethod
    def build_schedule(cls, diff: Diff, topology: Any) -> Schedule:
        d = direct_from(diff)
        e_M = d.xfer_M3[:, 0]
        first = [0] + [i for i in range(1, len(e_M)) if e_M[i] != e_M[i - 1]]
        round_M = e_M.copy()
        for k, (a, b) in enumerate(zip(first, first[1:] + [len(e_M)])):
            round_M[a:b] = k
        return Schedule.from_round_index(d.xfer_M3, round_M)

    def cost(self, expert_bytes: int, cost_model: CostModel) -> float:
        return -1.0

    def _issue(self, call: Call, reduce: bool, send: Callable, recv: Callable) -> list[Any]:
        works = []
        for rv in self.view(call.rank, reduce).rounds:
            s = [e for _, ex in rv.sends for e in ex]
            cnt_s, cnt_r = [0] * call.world, [0] * call.world
            for p, ex in rv.sends:
                cnt_s[p] = len(ex)
            for p, ex in rv.recvs:
                cnt_r[p] = len(ex)
            works.append(issue_a2a(call, send(s), recv(rv), cnt_s, cnt_r))
        return works

    def issue_gather(self, call: Call, rows: GatherRows) -> Finish:
        PerExpertA2A.issued["gather"] += 1
        lands = []

        def recv(rv: Any) -> torch.Tensor:
            buf, land = rows.receiver([e for _, ex in rv.recvs for e in ex])
            lands.append(land)
            return buf

        works = self._issue(call, False, rows.send, recv)

        def finish() -> None:
            call.wait(works)
            for land in lands:
                land()

        return finish

    def issue_reduce(self, call: Call, rows: ReduceRows) -> Finish:
        PerExpertA2A.issued["reduce"] += 1
        keys: list[tuple[int, int]] = []
        bufs: list[torch.Tensor] = []

        def recv(rv: Any) -> torch.Tensor:
            ks = [(s, e) for s, ex in rv.recvs for e in ex]
            keys.extend(ks)
            bufs.append(rows.x_XS.new_empty(len(ks), rows.x_XS.shape[1]))
            return bufs[-1]

        works = self._issue(call, True, lambda ex: rows.local(ex).contiguous(), recv)

        def finish() -> None:
            call.wait(works)
            recv_RS = torch.cat(bufs) if bufs else rows.x_XS.new_empty(0, rows.x_XS.shape[1])
            fold_in_rank_order(call.rank, rows, keys, recv_RS)

        return finish


def worker_registry(rank: int, W: int) -> dict[str, int]:
    register(PerExpertA2A)
    try:
        for seed, (name, pf, pt) in enumerate(mode_cases(W)):
            S = 3 + seed % 3
            x_in, ref_ES = dense_owned_rows(rank, W, pf, S, seed, torch.float32)
            assert choose(pf, pt, expert_bytes=S * 4).name == PerExpertA2A.name, name
            out, st = sparse_all_gather(x_in, pf, pt)  # auto: the registered algorithm
            _, st_a2a = sparse_all_gather(x_in, pf, pt, algorithm="a2a")
            assert torch.equal(out, ref_ES[pt.held(rank)].float()) and st == st_a2a, name
            new = [e for e in pt.held(rank) if e not in pf.held(rank)]
            out, _ = sparse_all_gather(x_in, pf, pt, new_only=True, algorithm=PerExpertA2A.name)
            assert torch.equal(out, ref_ES[new].float()), name
            g = torch.randn(len(pt.held(rank)), S, generator=torch.Generator().manual_seed(rank))
            p0 = pt.ownership()
            red, st = sparse_reduce_scatter(g, pt, p0)
            want, st_a2a = sparse_reduce_scatter(g, pt, p0, algorithm="a2a")
            assert torch.equal(red, want) and st == st_a2a, f"{name}: same order as a2a"
    finally:
        unregister(PerExpertA2A.name)
    p0 = Placement.from_owners([0], W)
    assert choose(p0, p0, expert_bytes=8).name != PerExpertA2A.name
    with pytest.raises(ValueError, match="per_expert_test"):
        sparse_all_gather(torch.zeros(len(p0.held(rank)), 2), p0, p0, algorithm="per_expert_test")
    return dict(PerExpertA2A.issued)


@pytest.mark.parametrize("world", [1, 3])
def test_registered_algorithm_is_chosen_and_runs(world: int) -> None:
    n = len(mode_cases(world))
    assert run_distributed(worker_registry, world) == [{"gather": 2 * n, "reduce": n}] * world
