"""Experts as torch parameters: each rank's stacked bank parameters hold only its own rows.

Legend: E experts of a bank, O rows this rank holds (its owned experts), R replica rows,
S elements of one expert (all its parameters), B bytes of one packed row.

[Note: expert parameters]
Under ep and fssdp every stacked parameter of a bank (`w_in [E, D, H]`, …) is replaced by a
parameter of the same name holding the rows of the experts this rank owns, in expert-id order
(`[O, D, H]`; `bank.expert_ids` names them). They stay registered under their FQNs, so
`model.parameters()`, any torch optimizer and its param groups, LR schedulers, clipping and DCP
see them as they are; autograd accumulates their gradients where the rank computes with them,
and spRS adds the replicas' gradients there. Replicas are not parameters: a flat `[R, S]`
buffer per bank per step, viewed per name by `RowLayout.views` (FSDP2's pattern of unsharded
views swapped in around compute). Re-sharding changes a parameter's rows in place (`p.data`
gets the new rows; the Parameter object, and so the optimizer's reference, stays) and moves
every per-row optimizer state tensor with them ([Note: per-row optimizer state]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.common.experts import ExpertBank


@dataclass(frozen=True)
class RowLayout:
    """How one expert of a bank flattens into a row of S elements (the unit FSSDP moves)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # one expert's shape per parameter
    numel: int  # S
    dtype: torch.dtype

    @classmethod
    def of(cls, bank: ExpertBank) -> RowLayout:
        params = list(bank.named_parameters(recurse=False))
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) != 1:
            raise ValueError(f"bank {bank.bank_name!r}: expert parameters must share one dtype")
        shapes = tuple(tuple(p.shape[1:]) for _, p in params)
        numel = sum(_prod(s) for s in shapes)
        return cls(tuple(n for n, _ in params), shapes, numel, dtypes.pop())

    def views(self, rows_RS: Tensor) -> dict[str, Tensor]:
        """Stacked-weight views [R, *shape] of flat rows, as `ExpertBank.compute` expects."""
        R = rows_RS.shape[0]
        # One split, not a slice per parameter: its backward writes every parameter's gradient
        # into one [R, S] buffer, where a slice's backward zero-fills a whole [R, S] tensor each
        # (seen in a profile as ~10% of an FSSDP step on CPU).
        parts = rows_RS.split([_prod(s) for s in self.shapes], dim=1)
        return {n: p.view(R, *s) for n, s, p in zip(self.names, self.shapes, parts)}

    def pack(self, tensors: dict[str, Tensor], rows: Tensor | None = None) -> Tensor:
        """[k, S] flat rows (a copy) from per-name [O, *shape] tensors, optionally only `rows`."""
        parts = [tensors[n] if rows is None else tensors[n].index_select(0, rows)
                 for n in self.names]
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def row_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_bank(bank: ExpertBank, owned: Sequence[int]) -> None:
    """Keep only the rows of `owned` experts in every stacked parameter of `bank`.

    On the meta device nothing is allocated (the caller's `to_empty` does it); a materialised
    bank keeps the values of those rows.
    """
    ids = tuple(int(e) for e in owned)
    for name, p in list(bank.named_parameters(recurse=False)):
        if p.is_meta:
            rows = torch.empty((len(ids), *p.shape[1:]), dtype=p.dtype, device="meta")
        else:
            rows = p.detach().index_select(0, torch.tensor(ids, dtype=torch.long, device=p.device))
        setattr(bank, name, nn.Parameter(rows, requires_grad=p.requires_grad))
    bank.expert_ids = ids


# [Note: per-row optimizer state]
# An optimizer's state for a bank parameter is "per row" when it is a tensor whose leading dim
# is the parameter's (AdamW's exp_avg / exp_avg_sq, SGD's momentum, Adafactor's factored
# moments of a 3-D weight): those rows belong to experts and move with them. Anything else
# (AdamW's scalar `step`) is per parameter and stays.


def per_row_state(opt: torch.optim.Optimizer | None, p: Tensor) -> dict[str, Tensor]:
    if opt is None or p not in opt.state:
        return {}
    return {
        k: v
        for k, v in opt.state[p].items()
        if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == p.shape[0]
    }
