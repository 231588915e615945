"""Topology-aware token assignment: which holder computes each (token, expert) row.

Legend: W ranks, E experts, s a source rank (where the rows are routed), h / dst a holder rank
(one that holds the expert, owner or replica), M moves (src, expert, dst, rows), N rows one
rank routes into the bank.

Every rank runs `assign_tokens` on the same all-gathered count matrix [W, E] and gets the same
`Assignment`, so no negotiation is needed before the all-to-all (fssdp/dispatch.py).
Rows per holder: fssdp/quotas.py ([Note: even split, then nearest replica],
[Note: levelling quotas], [Note: planned rows]); which rows fill them: fssdp/fill.py
([Note: filling quotas]).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from collectives.placement import Placement, Topology
from fssdp.fill import Fill, fill
from fssdp.host import add_at, host, host_array
from fssdp.quotas import LEVEL_GAIN, holder_rows

__all__ = [
    "LEVEL_GAIN",
    "Assignment",
    "as_counts",
    "assign_tokens",
    "expert_quotas",
    "holder_quotas",
    "rows_per_rank",
    "send_counts",
]

I64 = torch.int64
Chunk = tuple[int, int]  # (dest_rank, n_rows)
Plan = list[list[list[Chunk]]]  # plan[s][e] -> chunks of source s's rows of expert e


def as_counts(counts_WE: Any, world_size: int, num_experts: int, signs: bool = True) -> Tensor:
    """counts_WE (nested lists or a tensor) as a validated [W, E] int64 tensor (`signs`:
    also reject negative counts here; the planner checks them with its own sync)."""
    if not isinstance(counts_WE, Tensor):
        rows = list(counts_WE)
        if len(rows) != world_size:
            raise ValueError(
                f"counts_WE has {len(rows)} rows, expected one per rank (W={world_size})"
            )
        for s, row in enumerate(rows):
            if len(row) != num_experts:
                raise ValueError(
                    f"counts_WE[{s}] has {len(row)} entries, expected one per expert "
                    f"(E={num_experts})"
                )
        counts_WE = torch.tensor(rows, dtype=I64).reshape(world_size, num_experts)
    if counts_WE.dim() != 2 or counts_WE.shape[0] != world_size:
        raise ValueError(
            f"counts_WE has {counts_WE.shape[0] if counts_WE.dim() else 0} rows, expected one "
            f"per rank (W={world_size})"
        )
    if counts_WE.shape[1] != num_experts:
        raise ValueError(
            f"counts_WE[0] has {counts_WE.shape[1]} entries, expected one per expert "
            f"(E={num_experts})"
        )
    if counts_WE.dtype.is_floating_point:
        raise ValueError(f"counts_WE must hold integer row counts, got {counts_WE.dtype}")
    counts_WE = counts_WE.to(I64)
    if signs and counts_WE.numel() and bool((counts_WE < 0).any()):
        s = int(torch.nonzero((counts_WE < 0).any(1))[0])
        raise ValueError(f"counts_WE[{s}] has a negative count: {counts_WE[s].tolist()}")
    return counts_WE


class Assignment:
    """Where every source's rows of every expert are computed (the result of `assign_tokens`).

    `moves` [M, 4] int64 rows (src, expert, dst, rows), rows > 0, sorted by (src, expert,
    dst), one row per (src, expert, dst). Per-rank accessors (`send_counts`, `recv_counts`,
    `send_order`, `received_experts`) read the fill's host arrays directly (O(E + P) or
    O(W E) elementwise per call; [Note: the control plane on the host] in fssdp/host.py) and
    return lists or tensors on the counts' device; `moves` and the nested-list view
    `assignment[s][e] -> [(dst, n), ...]` are built on first use.
    """

    def __init__(
        self, W: int, E: int, chunks: Fill, rows_P: np.ndarray, rank_P: np.ndarray,
        device: torch.device,
    ) -> None:
        self.world_size, self.num_experts = W, E
        self._fill, self._rows_P, self._rank_P = chunks, rows_P, rank_P
        self.device = device  # the counts' device: where tensors handed out live
        self._moves: Tensor | None = None
        self._plan: Plan | None = None
        # per-rank views, made once: a call asks for its rank's receive counts and received
        # experts (both from `_to_dst`), and its send order
        self._dst: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # -- per-rank accessors (what the executor uses) --------------------------------------------
    def rows_per_rank(self) -> Tensor:
        """[W] int64: rows each rank computes."""
        return torch.from_numpy(add_at(self.world_size, self._rank_P, self._rows_P))

    def _of_src(self, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expert, dst, rows) of every chunk of `src` (rows may be 0)."""
        W, E = self.world_size, self.num_experts
        d_C, n_C = self._fill.dense
        cell_S, dst_S, rows_S = self._fill.sparse
        mine = np.flatnonzero((cell_S % W == src) & (rows_S > 0))
        e = np.concatenate([np.arange(E), cell_S[mine] // W])
        d = np.concatenate([d_C[src::W], dst_S[mine]])
        return e, d, np.concatenate([n_C[src::W], rows_S[mine]])

    def send_counts(self, src: int) -> list[int]:
        """Rows `src` sends to each dst (its own entry counts rows that stay local)."""
        _, d, n = self._of_src(src)
        return add_at(self.world_size, d, n).tolist()

    def _to_dst(self, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, expert, rows) of every chunk to `dst` with rows > 0, unordered."""
        if dst not in self._dst:
            self._dst[dst] = self._chunks_to(dst)
        return self._dst[dst]

    def _chunks_to(self, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        W = self.world_size
        d_C, n_C = self._fill.dense
        cell_S, dst_S, rows_S = self._fill.sparse
        dense = np.flatnonzero((d_C == dst) & (n_C > 0))
        mine = np.flatnonzero((dst_S == dst) & (rows_S > 0))
        cell = np.concatenate([dense, cell_S[mine]])
        return cell % W, cell // W, np.concatenate([n_C[dense], rows_S[mine]])

    def recv_counts(self, dst: int) -> list[int]:
        """Rows `dst` gets from each src."""
        s, _, n = self._to_dst(dst)
        return add_at(self.world_size, s, n).tolist()

    def received_experts(self, dst: int) -> Tensor:
        """[M_dst] int64: the expert of every row `dst` receives, by src, then expert."""
        s, e, n = self._to_dst(dst)
        order = np.argsort(s * self.num_experts + e, kind="stable")
        return torch.from_numpy(np.repeat(e[order], n[order])).to(self.device)

    def send_order(self, expert_N: Tensor, src: int) -> tuple[Tensor, list[int]]:
        """(perm_N, send_counts(src)): src's rows (indices into expert_N, on its device)
        grouped by dst ascending, within a dst by expert ascending; a source's rows of expert e
        are cut, in their original order, into its chunks in dst order."""
        e, d, n = self._of_src(src)
        keep = np.flatnonzero(n > 0)
        e, d, n = e[keep], d[keep], n[keep]
        order = np.argsort(e * self.world_size + d, kind="stable")
        d, n = d[order], n[order]
        if int(n.sum()) != expert_N.numel():
            raise ValueError(
                f"Assignment.send_order: rank {src} routes {expert_N.numel()} rows but the "
                f"count matrix says {int(n.sum())}"
            )
        dev = expert_N.device
        order_N = torch.argsort(expert_N, stable=True)
        dst_N = torch.from_numpy(np.repeat(d, n)).to(dev)
        perm_N = torch.argsort(dst_N, stable=True)
        return order_N.index_select(0, perm_N), add_at(self.world_size, d, n).tolist()

    # -- global views -------------------------------------------------------------------------
    @property
    def moves(self) -> Tensor:
        """[M, 4] int64 (src, expert, dst, rows), sorted by (src, expert, dst)."""
        if self._moves is None:
            W, E = self.world_size, self.num_experts
            d_C, n_C = self._fill.dense
            cell_S, dst_S, rows_S = self._fill.sparse
            dense, sparse = np.flatnonzero(n_C > 0), np.flatnonzero(rows_S > 0)
            c = np.concatenate([dense, cell_S[sparse]])
            d = np.concatenate([d_C[dense], dst_S[sparse]])
            n = np.concatenate([n_C[dense], rows_S[sparse]])
            m = np.stack([c % W, c // W, d, n], 1)
            key = (m[:, 0] * E + m[:, 1]) * W + m[:, 2]
            self._moves = torch.from_numpy(m[np.argsort(key)]).to(self.device)
        return self._moves

    def _nested(self) -> Plan:
        if self._plan is None:
            plan: Plan = [[[] for _ in range(self.num_experts)] for _ in range(self.world_size)]
            for s, e, d, n in self.moves.tolist():
                plan[s][e].append((d, n))
            self._plan = plan
        return self._plan

    def __getitem__(self, src: int) -> list[list[Chunk]]:
        return self._nested()[src]

    def __len__(self) -> int:
        return self.world_size

    def __iter__(self) -> Iterator[list[list[Chunk]]]:
        return iter(self._nested())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Assignment):
            return (self.world_size, self.num_experts) == (
                other.world_size,
                other.num_experts,
            ) and torch.equal(self.moves.cpu(), other.moves.cpu())
        if isinstance(other, list):
            return self._nested() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Assignment(W={self.world_size}, E={self.num_experts}, moves={len(self.moves)})"


def assign_tokens(counts_WE: Any, placement: Placement, topology: Topology) -> Assignment:
    """Where source s sends its rows of expert e ([Note: filling quotas] in fssdp/fill.py).

    counts_WE may be a [W, E] tensor (on any device; the result lives there) or nested lists.
    """
    W, E = topology.world_size, placement.num_experts
    if placement.world_size != W:
        raise ValueError(
            f"assign_tokens: placement is for world {placement.world_size}, topology for {W}"
        )
    planned = placement.planned
    if planned is not None and planned.counts_WE is counts_WE:
        counts = counts_WE  # validated by the planner that planned these rows
    else:
        counts = as_counts(counts_WE, W, E)
    pl = placement.to(counts.device)
    if E == 0:
        z = np.zeros(0, dtype=np.int64)
        return Assignment(W, E, Fill((z, z), (z, z, z)), z, z, counts.device)
    rows_P = holder_rows(counts, pl, topology)
    hp = host(pl)
    # a fresh contiguous copy (fill overwrites it)
    counts_EW = host_array(counts.t().clone(memory_format=torch.contiguous_format))
    chunks = fill(counts_EW, hp.expert_P, hp.rank_P, hp.cell_P, rows_P, topology.ranks_per_node)
    return Assignment(W, E, chunks, rows_P, hp.rank_P, counts.device)


def rows_per_rank(counts_WE: Any, plan: Assignment | Plan) -> list[int]:
    """Rows each rank computes under `plan` (counts_WE only fixes W and checks the plan)."""
    if isinstance(plan, Assignment):
        rows = plan.rows_per_rank().tolist()
        total = int(as_counts(counts_WE, plan.world_size, plan.num_experts).sum())
    else:
        W = len(plan)
        rows = [0] * W
        for per_e in plan:
            for chunks in per_e:
                for h, n in chunks:
                    rows[h] += n
        total = int(as_counts(counts_WE, W, len(plan[0]) if W else 0).sum())
    if total != sum(rows):
        raise ValueError(f"rows_per_rank: plan moves {sum(rows)} rows but counts hold {total}")
    return rows


def send_counts(plan: Assignment | Plan, src: int, world: int) -> list[int]:
    """Rows `src` sends to each dest rank (its own entry counts rows that stay local)."""
    if isinstance(plan, Assignment):
        return plan.send_counts(src)
    out = [0] * world
    for chunks in plan[src]:
        for h, n in chunks:
            out[h] += n
    return out


# -- per-expert views (tests, debugging) --------------------------------------------------------


def holder_quotas(col_W: Sequence[int], holders: Sequence[int], topology: Topology) -> list[int]:
    """Even-split rows of one expert's holders (sorted rank order) for per-source rows col_W:
    holder j computes floor(L (j+1) / |H|) - floor(L j / |H|), L = sum(col_W)."""
    del topology  # node shares follow from rank order ([Note: even split, then nearest replica])
    total, n = sum(col_W), len(holders)
    return [total * (j + 1) // n - total * j // n for j in range(n)]


def expert_quotas(
    counts_WE: Any, placement: Placement, topology: Topology
) -> list[dict[int, int]]:
    """Rows each holder computes, per expert, as `assign_tokens` would ({rank: rows})."""
    counts = as_counts(counts_WE, topology.world_size, placement.num_experts)
    pl = placement.to(counts.device)
    rows = holder_rows(counts, pl, topology).tolist()
    out: list[dict[int, int]] = [{} for _ in range(placement.num_experts)]
    pe, pr = pl.pairs_P()
    for e, r, n in zip(pe.tolist(), pr.tolist(), rows):
        out[e][r] = n
    return out
