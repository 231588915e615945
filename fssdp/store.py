"""The per-rank store of owned experts: parameters, gradients and AdamW state.

Only one copy of an expert's optimizer state exists: its owner's (DESIGN.md §2). The store keeps
each bank's owned experts as flat rows (`ExpertLayout`), steps them with AdamW using the dense
optimizer's hyper-parameters, moves rows and state when ownership changes, and names everything
by global (bank, expert) in checkpoints so a save at world N loads at world M.

Legend: O owned experts of a bank on this rank, S elements per expert, E experts of the bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from collectives.placement import Placement
from collectives.sparse import sparse_all_gather
from fssdp.layout import ExpertLayout


@dataclass
class BankShard:
    """One bank's experts owned by this rank."""

    layout: ExpertLayout
    ownership: Placement  # owner of every expert of the bank (P0)
    rows_OS: Tensor  # owned experts' parameters, ordered by expert id
    exp_avg_OS: Tensor
    exp_avg_sq_OS: Tensor
    decay_S: Tensor  # 1.0 where weight decay applies
    # Mean-over-ranks gradient of the owned rows, set by the runtime after spRS; None when the
    # bank was not used this step (then, like torch's AdamW, its experts are not stepped).
    grad_OS: Tensor | None = None

    def owned(self, rank: int) -> list[int]:
        return self.ownership.owned(rank)


class ExpertStore:
    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.banks: dict[str, BankShard] = {}
        self.step = 0  # AdamW steps taken (bias correction)

    def add_bank(self, layout: ExpertLayout, full_ES: Tensor, ownership: Placement) -> BankShard:
        """Keep this rank's rows of a bank whose full [E, S] weights every rank built alike."""
        idx = torch.tensor(ownership.owned(self.rank), dtype=torch.long, device=full_ES.device)
        rows = full_ES.index_select(0, idx).clone()
        shard = BankShard(
            layout,
            ownership,
            rows,
            torch.zeros_like(rows),
            torch.zeros_like(rows),
            layout.decay_mask(full_ES.device),
        )
        self.banks[layout.bank_name] = shard
        return shard

    # -- optimizer ---------------------------------------------------------------------------
    @torch.no_grad()
    def grad_sq_norm(self) -> Tensor:
        """Σ of squared owned gradients on this rank (summed over ranks by the caller)."""
        total = torch.zeros((), dtype=torch.float64)
        for s in self.banks.values():
            if s.grad_OS is not None:
                total += s.grad_OS.double().pow(2).sum().cpu()
        return total

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        for s in self.banks.values():
            if s.grad_OS is not None:
                s.grad_OS.mul_(factor)

    @torch.no_grad()
    def adamw_step(self, group: dict[str, Any]) -> None:
        """One AdamW step (the same update as torch.optim.AdamW, foreach=False)."""
        self.step += 1
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bc1 = 1 - b1**self.step
        bc2_sqrt = math.sqrt(1 - b2**self.step)
        for s in self.banks.values():
            if s.grad_OS is None:
                continue
            g = s.grad_OS
            s.rows_OS.mul_(1 - lr * wd * s.decay_S)
            s.exp_avg_OS.lerp_(g, 1 - b1)
            s.exp_avg_sq_OS.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (s.exp_avg_sq_OS.sqrt() / bc2_sqrt).add_(eps)
            s.rows_OS.addcdiv_(s.exp_avg_OS, denom, value=-lr / bc1)

    def zero_grad(self) -> None:
        for s in self.banks.values():
            s.grad_OS = None

    # -- ownership changes -------------------------------------------------------------------
    @torch.no_grad()
    def reshard(self, new_owner: dict[str, list[int]]) -> int:
        """Move experts (parameters and AdamW state) to new owners; return rows moved."""
        moved = 0
        for name, s in self.banks.items():
            old = s.ownership
            target = Placement.from_owners(new_owner[name], old.world_size)
            extra = {
                e: [target.owner[e]]
                for e in range(old.num_experts)
                if target.owner[e] != old.owner[e]
            }
            if not extra:
                continue
            moved += len(extra)
            union = old.with_replicas(extra)
            packed_O3S = torch.cat([s.rows_OS, s.exp_avg_OS, s.exp_avg_sq_OS], dim=1)
            held, _ = sparse_all_gather(packed_O3S, old, union, self.group, phase=f"reshard {name}")
            row_of = {e: i for i, e in enumerate(union.held(self.rank))}
            idx = torch.tensor(
                [row_of[e] for e in target.owned(self.rank)],
                dtype=torch.long,
                device=packed_O3S.device,
            )
            rows, m1, m2 = held.index_select(0, idx).chunk(3, dim=1)
            s.rows_OS, s.exp_avg_OS, s.exp_avg_sq_OS = (t.contiguous() for t in (rows, m1, m2))
            s.ownership = target
        return moved

    # -- checkpoints: keyed by global (bank, expert) -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        params: dict[str, Tensor] = {}
        optim: dict[str, Tensor] = {}
        for name, s in self.banks.items():
            for i, e in enumerate(s.owned(self.rank)):
                for pname, view in s.layout.views(s.rows_OS[i : i + 1]).items():
                    params[f"{name}.{pname}.{e}"] = view[0]
                for key, t in (("exp_avg", s.exp_avg_OS), ("exp_avg_sq", s.exp_avg_sq_OS)):
                    for pname, view in s.layout.views(t[i : i + 1]).items():
                        optim[f"{name}.{pname}.{e}.{key}"] = view[0]
        return {"params": params, "optim": optim, "step": self.step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Fill owned rows in place from a state dict shaped like `state_dict()`'s."""
        self.step = int(sd["step"])
        # `state_dict()` returns views of the owned rows, so DCP's in-place load already wrote
        # them; copying again covers callers that pass fresh tensors.
        mine = self.state_dict()
        for key, dst in mine["params"].items():
            if sd["params"][key] is not dst:
                dst.copy_(sd["params"][key])
        for key, dst in mine["optim"].items():
            if sd["optim"][key] is not dst:
                dst.copy_(sd["optim"][key])

    def state_bytes(self) -> int:
        """Parameters + gradient + AdamW moments of the owned experts."""
        total = 0
        for s in self.banks.values():
            total += 4 * s.rows_OS.numel() * s.rows_OS.element_size()
        return total
