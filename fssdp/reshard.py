"""Move experts to new owners: their parameter rows and every per-row optimizer state tensor.

Legend: O rows a rank owns before, O' after, B bytes of one packed row (the expert's parameters
and its optimizer state, as raw bytes).

[Note: moving rows with their state]
Each bank parameter's rows and its per-row optimizer state ([Note: per-row optimizer state] in
fssdp/expert_params.py) are packed as raw bytes into one [O, B] row per expert (any dtype mix),
sent by one SparseAllGather from the old owners to the new ones (P0_old ∪ new owners), and
unpacked into new tensors of O' rows. A parameter keeps its identity (`p.data` changes), so the
optimizer's param groups need no update; its state tensors are replaced in `opt.state[p]`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from collectives.placement import Placement
from collectives.sparse import sparse_all_gather
from fssdp.expert_params import per_row_state
from models.common.experts import ExpertBank


def _pieces(bank: ExpertBank, opt: torch.optim.Optimizer | None) -> list[tuple[Tensor, str]]:
    """Every per-row tensor of the bank, in a fixed order: (tensor, '' or its state key)."""
    out: list[tuple[Tensor, str]] = []
    for p in bank.parameters(recurse=False):
        out.append((p, ""))
        out.extend((v, k) for k, v in sorted(per_row_state(opt, p).items()))
    return out


@torch.no_grad()
def reshard_bank(
    bank: ExpertBank,
    opt: torch.optim.Optimizer | None,
    old: Placement,
    new: Placement,
    group: dist.ProcessGroup | None,
    timeout_s: float,
) -> int:
    """Move `bank`'s experts from the owners of `old` to those of `new`; return experts moved."""
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    moved = {e: [new.owner[e]] for e in range(old.num_experts) if new.owner[e] != old.owner[e]}
    if not moved:
        return 0
    pieces = _pieces(bank, opt)
    O = len(old.owned(rank))
    packed_OB = torch.cat([t.reshape(O, -1).contiguous().view(torch.uint8) for t, _ in pieces], 1)
    union = old.with_replicas(moved)
    held, _ = sparse_all_gather(
        packed_OB, old, union, group, phase=f"reshard {bank.bank_name}", timeout_s=timeout_s
    )
    row_of = {e: i for i, e in enumerate(union.held(rank))}
    mine = new.owned(rank)
    idx = torch.tensor([row_of[e] for e in mine], dtype=torch.long, device=held.device)
    rows_B = held.index_select(0, idx)
    widths = [_row_bytes(t) for t, _ in pieces]
    parts = rows_B.split(widths, dim=1)
    params = list(bank.parameters(recurse=False))
    for (t, key), part in zip(pieces, parts):
        value = part.contiguous().view(t.dtype).reshape(len(mine), *t.shape[1:])
        if key == "":
            t.data = value
            t.grad = None
            p = t
        else:
            opt.state[p][key] = value  # type: ignore[union-attr]
    assert all(q.shape[0] == len(mine) for q in params)
    bank.expert_ids = tuple(mine)
    return len(moved)


def _row_bytes(t: Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n * t.element_size()
