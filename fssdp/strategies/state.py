"""The one checkpoint layout every strategy reads and writes.

# [Note: checkpoint layout]
Keys under the trainer's `app` entry (DESIGN.md §6: experts keyed by global (bank, expert)):

    model.<fqn>                                  dense parameters (torch's get_state_dict names)
    optim.state.<fqn>.{step,exp_avg,exp_avg_sq}  dense AdamW state; optim.param_groups.*
    experts.params.<bank>.<pname>.<e>            expert e's slice of a stacked bank parameter
    experts.optim.<bank>.<pname>.<e>.{exp_avg,exp_avg_sq}
    experts.step                                 AdamW steps taken by the experts (one value:
                                                 every bank gets a gradient every step)

FSSDP/EP hold experts as rows of the `ExpertStore` and write this natively. Strategies that keep
stacked `[E, ...]` bank parameters (none, ddp, fsdp) split them into per-expert views of the rows
this rank holds, so DCP reads and writes in place. FSDP2 shards bank parameters on dim 0: a
rank's local rows are the global experts [offset, offset + rows). A save at any world size and
strategy therefore loads at any other; DCP dedups the replicated rows of ddp.

Legend: E experts of a bank, R rows of a bank this rank holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.common.experts import ExpertBank

MOMENTS = ("exp_avg", "exp_avg_sq")


def bank_param_names(model: nn.Module) -> list[str]:
    """FQNs of every stacked bank parameter the model still holds (`<bank>.<pname>`)."""
    names = {n for n, _ in model.named_parameters()}
    out: list[str] = []
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, ExpertBank) and id(mod) not in seen:
            seen.add(id(mod))
            for pname, _ in mod.named_parameters(recurse=False):
                fqn = f"{mod.bank_name}.{pname}"
                if fqn not in names:  # a bank not named by `name_banks` would save wrongly
                    raise ValueError(f"bank parameter {fqn!r} is not a parameter FQN")
                out.append(fqn)
    return out


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """(this rank's rows R of a stacked [E, ...] tensor, global id of the first), detached so
    that in-place reads and writes reach the tensor's storage."""
    if isinstance(t, DTensor):
        for pl in t.placements:
            if not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)):
                raise ValueError(f"stacked bank tensor with placement {pl}: expected Shard(0)")
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local().detach(), int(offset[0])
    return t.detach(), 0


def _per_expert(t: Tensor, key: str, suffix: str = "") -> dict[str, Tensor]:
    rows_R, first = _rows(t)
    return {f"{key}.{first + i}{suffix}": rows_R[i] for i in range(rows_R.shape[0])}


def split_experts(fqns: list[str], msd: dict[str, Any], osd: dict[str, Any]) -> dict[str, Any]:
    """Move the stacked bank entries out of (msd, osd) into the per-expert layout."""
    params: dict[str, Tensor] = {}
    optim: dict[str, Tensor] = {}
    step = 0
    for fqn in fqns:
        params.update(_per_expert(msd.pop(fqn), fqn))
        st = osd["state"].pop(fqn, None)
        if st is None:
            raise ValueError(f"optimizer has no state for bank parameter {fqn}")
        step = int(st["step"])
        for m in MOMENTS:
            optim.update(_per_expert(st[m], fqn, f".{m}"))
    drop = set(fqns)
    for group in osd["param_groups"]:
        group["params"] = [p for p in group["params"] if p not in drop]
    return {"params": params, "optim": optim, "step": step}


@torch.no_grad()
def merge_experts(fqns: list[str], msd: dict[str, Any], osd: dict[str, Any], sd: Any) -> None:
    """Copy loaded per-expert entries into the stacked tensors of (msd, osd) (the rows held
    here; a self-copy where DCP already loaded into views of them)."""
    for fqn in fqns:
        for key, dst in _per_expert(msd[fqn], fqn).items():
            dst.copy_(sd["params"][key])
        st = osd["state"][fqn]
        for m in MOMENTS:
            for key, dst in _per_expert(st[m], fqn, f".{m}").items():
                dst.copy_(sd["optim"][key])
        st["step"] = torch.full_like(st["step"], float(sd["step"]))


def layout_state_dict(
    model: nn.Module, opt: torch.optim.Optimizer, experts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint layout of `model` + `opt`; `experts` when a store holds them instead."""
    msd, osd = get_state_dict(model, opt)
    fqns = bank_param_names(model)
    split = split_experts(fqns, msd, osd)
    return {"model": msd, "optim": osd, "experts": split if experts is None else experts}


def load_layout(model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load dense entries (and stacked bank rows, if the model has any) from `sd`.

    The current optimizer's param groups are kept: their hyper-parameters come from the config
    (lr from the schedule), and saved ones may list bank parameters another strategy lacks.
    """
    msd, osd = get_state_dict(model, opt)
    msd.update(sd["model"])
    osd["state"].update(sd["optim"]["state"])
    merge_experts(bank_param_names(model), msd, osd, sd["experts"])
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
