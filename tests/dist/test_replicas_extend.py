"""Calibration's re-plan on 4 gloo ranks ([Note: re-planning the prefetched slots] in
fssdp/plan_exact.py): `Replicas.extend` to a placement that keeps some prefetched replicas,
drops one and adds three gathers only the three new pairs, holds exactly the new placement's
experts with their owners' values, and its gradient reduce reaches the owners from the holders
it kept and added (none from the dropped one)."""

from __future__ import annotations

import torch

from tests.support.harness import run_distributed

S = 5  # elements per expert
OWNER = [0, 1, 2, 3, 0, 1]
PREFETCHED = {2: [0, 1], 5: [2]}
BETTER = {2: [0], 4: [1, 3], 5: [2, 3]}  # drops (2, 1); keeps (2, 0), (5, 2); adds three


def expert_row(e: int) -> torch.Tensor:
    return torch.arange(S, dtype=torch.float64) * 0.01 + e + 1


def _extend_job(rank: int, world: int) -> dict:
    from collectives.placement import Placement, Topology
    from fssdp.expert_params import RowLayout
    from fssdp.replicas import Replicas, ReplicaState

    own = Placement.from_owners(OWNER, world)
    mine = own.owned(rank)
    weight = torch.stack([expert_row(e) for e in mine])
    layout = RowLayout(("w",), ((S,),), S, torch.float64)
    rep = Replicas(layout, lambda: {"w": weight}, Topology(world, 2), rank, None, "auto", 60.0,
                   "bank")  # fmt: skip
    rep.gather(own, own.with_replicas(PREFETCHED))
    rep.wait(torch.device("cpu"), training=True)
    first = rep.bytes["spag"]
    rows_RS = rep.extend(own.with_replicas(BETTER), torch.device("cpu"))
    assert rep.state is ReplicaState.HELD
    # bit for bit: a transferred copy of the owner's row, against the very same computation
    # (expert_row) made here; no arithmetic happens in between
    rows_ok = all(torch.equal(rows_RS[i], expert_row(e)) for i, e in enumerate(rep.ids))
    (rows_RS * (rank + 1)).sum().backward()  # replica of e on rank r: gradient r + 1
    reduced = rep.finish()
    return {
        "ids": list(rep.ids),
        "rows_ok": rows_ok,
        "spag_first": first,
        "spag_total": rep.bytes["spag"],
        "owned": mine,
        "grads": None if reduced is None else reduced[:, 0].tolist(),
    }


def test_extend_gathers_only_the_new_pairs_and_reduces_the_new_placement() -> None:
    out = run_distributed(_extend_job, 4)
    row_bytes = S * 8
    held = {r: sorted(e for e, ranks in BETTER.items() if r in ranks) for r in range(4)}
    for r, got in enumerate(out):
        assert got["ids"] == held[r], (r, got["ids"])
        assert got["rows_ok"], r  # a copy of the owner's row, bit for bit
    assert sum(g["spag_first"] for g in out) == 3 * row_bytes  # the prefetch: 3 pairs
    assert sum(g["spag_total"] - g["spag_first"] for g in out) == 3 * row_bytes  # 3 new pairs
    for r, got in enumerate(out):
        want = [float(sum(h + 1 for h in BETTER.get(e, []))) for e in got["owned"]]
        assert got["grads"] == want, (r, got["grads"], want)
