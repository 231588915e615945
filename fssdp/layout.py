"""How one expert of a bank flattens into a row of S elements: the unit FSSDP moves.

Legend: R rows (experts), S elements per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from launch.optim import no_weight_decay
from models.common.experts import ExpertBank


@dataclass(frozen=True)
class ExpertLayout:
    bank_name: str
    num_experts: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # one expert's shape per parameter
    offsets: tuple[int, ...]
    numel: int  # S
    dtype: torch.dtype

    @classmethod
    def of(cls, bank: ExpertBank) -> ExpertLayout:
        names, shapes, offsets, off = [], [], [], 0
        dtypes = set()
        for name, p in bank.named_parameters(recurse=False):
            names.append(name)
            shapes.append(tuple(p.shape[1:]))
            offsets.append(off)
            off += p[0].numel()
            dtypes.add(p.dtype)
        if len(dtypes) != 1:
            raise ValueError(f"bank {bank.bank_name!r}: expert parameters must share one dtype")
        return cls(
            bank.bank_name,
            bank.num_experts,
            tuple(names),
            tuple(shapes),
            tuple(offsets),
            off,
            dtypes.pop(),
        )

    def views(self, rows_RS: Tensor) -> dict[str, Tensor]:
        """Stacked-weight views [R, *shape] of flat rows, as `ExpertBank.compute` expects."""
        R = rows_RS.shape[0]
        # One split, not a slice per parameter: its backward writes every parameter's gradient
        # into one [R, S] buffer, where a slice's backward zero-fills a whole [R, S] tensor each
        # (seen in a profile as ~10% of an FSSDP step on CPU).
        parts = rows_RS.split([_prod(s) for s in self.shapes], dim=1)
        return {n: p.view(R, *s) for n, s, p in zip(self.names, self.shapes, parts)}

    def flatten(self, stacked: dict[str, Tensor]) -> Tensor:
        """[E, S] rows from stacked weights name -> [E, *shape]."""
        return torch.cat([stacked[n].reshape(stacked[n].shape[0], -1) for n in self.names], 1)

    def decay_mask(self, device: torch.device) -> Tensor:
        """[S] 1.0 where AdamW's weight decay applies, 0.0 elsewhere."""
        parts = [
            torch.full((_prod(s),), 0.0 if no_weight_decay(n, len(s) + 1) else 1.0)
            for n, s in zip(self.names, self.shapes)
        ]
        return torch.cat(parts).to(device=device, dtype=self.dtype)

    def row_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
