"""This rank's rows in one sparse collective: where the rows it sends come from, where the rows it
receives go, and how an owner folds the copies it gets into its output.

Legend: S elements per expert row; X rows of some buffer, O owned rows (spRS output), K rows a
callable source returned, Y rows being written; `ex` a list of expert ids; `*_row` maps expert
id -> row of the buffer it names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RowSource = Callable[[list[int]], Tensor]  # rows(expert_ids ascending) -> [k, S]


def span(idx: Sequence[int]) -> slice | None:
    """idx as a slice when it is an ascending run (then rows can be viewed, not copied)."""
    if idx and idx[-1] - idx[0] == len(idx) - 1 and list(idx) == list(range(idx[0], idx[-1] + 1)):
        return slice(idx[0], idx[0] + len(idx))
    return None


def index(idx: Sequence[int], like: Tensor) -> Tensor:
    return torch.tensor(list(idx), dtype=torch.long, device=like.device)


def take(x_XS: Tensor, idx: Sequence[int]) -> Tensor:
    """Rows idx of x_XS: a view when they are one run, else a (contiguous) copy."""
    sl = span(idx)
    return x_XS[sl] if sl is not None else x_XS.index_select(0, index(idx, x_XS))


def put(out_XS: Tensor, idx: Sequence[int], rows_YS: Tensor) -> None:
    if not idx:
        return
    sl = span(idx)
    if sl is not None:
        out_XS[sl] = rows_YS
    else:
        out_XS.index_copy_(0, index(idx, out_XS), rows_YS)


def add(out_XS: Tensor, idx: Sequence[int], rows_YS: Tensor) -> None:
    """out[idx] += rows with idx unique: one addition per element, so the result is exact
    run to run on every device (no atomics race on a shared row)."""
    if not idx:
        return
    sl = span(idx)
    if sl is not None:
        out_XS[sl].add_(rows_YS)
    else:
        out_XS.index_add_(0, index(idx, out_XS), rows_YS)


def check_rows(x: Tensor, rows: int, what: str, op: str, rank: int) -> None:
    if x.dim() != 2 or x.shape[0] != rows:
        raise ValueError(
            f"{op}: rank {rank} expects input [{rows}, S] ({what}), got {list(x.shape)}"
        )


def output(out: Tensor | None, rows: int, S: int, like: Tensor, op: str, rank: int) -> Tensor:
    """The caller's preallocated output (checked) or a new one, [rows, S] like `like`."""
    if out is None:
        return like.new_empty(rows, S)
    if out.shape != (rows, S) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{op}: rank {rank}: out must be [{rows}, {S}] {like.dtype} on {like.device}, got "
            f"{list(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    return out


class GatherRows:
    """spAG on one rank: rows it sends come from its own rows (`own_XS`: the source tensor, or
    what a callable source returned) or, for experts it relays, from the output rows it has
    received; rows it receives land in `out_XS`."""

    def __init__(
        self,
        out_XS: Tensor,
        out_row: dict[int, int],
        own_XS: Tensor,
        own_row: dict[int, int],
    ) -> None:
        self.out_XS, self.out_row = out_XS, out_row
        self.own_XS, self.own_row = own_XS, own_row

    def send(self, ex: Sequence[int]) -> Tensor:
        """Contiguous [len(ex), S] rows of the experts ex (any order, repeats allowed)."""
        if all(e in self.own_row for e in ex):
            return take(self.own_XS, [self.own_row[e] for e in ex]).contiguous()
        if not any(e in self.own_row for e in ex):
            return take(self.out_XS, [self.out_row[e] for e in ex]).contiguous()
        buf_YS = self.out_XS.new_empty(len(ex), self.out_XS.shape[1])
        for i, e in enumerate(ex):  # mixed own and relayed rows (a rare tree message)
            buf_YS[i] = (
                self.own_XS[self.own_row[e]] if e in self.own_row else self.out_XS[self.out_row[e]]
            )
        return buf_YS

    def receiver(self, ex: Sequence[int]) -> tuple[Tensor, Callable[[], None]]:
        """(buffer to receive the rows of ex into, what to run once they arrived): a view of
        the output when ex's rows are one run of it, else a staging tensor copied in after."""
        dst = [self.out_row[e] for e in ex]
        sl = span(dst)
        if sl is not None:
            return self.out_XS[sl], lambda: None
        buf_YS = self.out_XS.new_empty(len(ex), self.out_XS.shape[1])
        return buf_YS, lambda: put(self.out_XS, dst, buf_YS)


class ReduceRows:
    """spRS on one rank: its copies (`x_XS`, rows `in_row`) and, as an owner, the output
    `out_OS` it folds contributions into (rows `out_row`).

    # [Note: folding]
    An owner's output row is a left fold of the contributions in the order the algorithm fixes:
    the first is written (`fold(..., first=True)`), later ones added; with `accumulate` every
    one is added onto what `out` held. `complete` finishes the experts that got nothing: the
    owner's own copy when it has one, else zeros (unchanged with `accumulate`).
    """

    def __init__(
        self,
        x_XS: Tensor,
        in_row: dict[int, int],
        out_OS: Tensor,
        owned: list[int],
        accumulate: bool,
    ) -> None:
        self.x_XS, self.in_row, self.out_OS = x_XS, in_row, out_OS
        self.owned = owned
        self.out_row = {e: i for i, e in enumerate(owned)}
        self.accumulate = accumulate

    def has_local(self, e: int) -> bool:
        return e in self.in_row

    def local(self, ex: Sequence[int]) -> Tensor:
        return take(self.x_XS, [self.in_row[e] for e in ex])

    def fold(self, o_idx: Sequence[int], rows_YS: Tensor, first: bool) -> None:
        """Fold rows into output rows o_idx (unique); see [Note: folding]."""
        if first and not self.accumulate:
            put(self.out_OS, o_idx, rows_YS)
        else:
            add(self.out_OS, o_idx, rows_YS)

    def fold_from(
        self, o_idx: Sequence[int], src_XS: Tensor, src_idx: Sequence[int], first: bool
    ) -> None:
        """fold(o_idx, src_XS[src_idx], first), a single row without indexing (a hot expert's
        many copies are folded one by one)."""
        if len(o_idx) != 1:
            self.fold(o_idx, take(src_XS, src_idx), first)
        elif first and not self.accumulate:
            self.out_OS[o_idx[0]].copy_(src_XS[src_idx[0]])
        else:
            self.out_OS[o_idx[0]].add_(src_XS[src_idx[0]])

    def complete(self, untouched: Sequence[int]) -> None:
        """Owned experts (ids) that no contribution reached."""
        alone = [e for e in untouched if self.has_local(e)]
        if alone:
            self.fold([self.out_row[e] for e in alone], self.local(alone), first=True)
        if not self.accumulate:
            for e in untouched:
                if not self.has_local(e):
                    self.out_OS[self.out_row[e]].zero_()
