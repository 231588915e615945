"""The one checkpoint layout every strategy reads and writes (a state-dict adapter).

# [Note: checkpoint layout]
Keys under the trainer's `app` entry (experts keyed by global (bank, expert)):

    model.<fqn>                                  dense parameters (torch's get_state_dict names)
    optim.state.<fqn>.<key>                      dense optimizer state; optim.param_groups.*
    experts.params.<bank>.<pname>.<e>            expert e's row of a stacked bank parameter
    experts.optim.<bank>.<pname>.<e>.<key>       its per-row optimizer state (AdamW: exp_avg,
                                                 exp_avg_sq; [Note: per-row optimizer state])
    experts.step                                 optimizer steps taken by the experts (one
                                                 value: every used bank steps every step)

Every strategy holds some rows of each stacked bank parameter: all of them (none, ddp), a
contiguous block (fsdp: FSDP2's Shard(0)), or the owned experts (ep, fssdp). `ExpertRows` says
which, and the adapter splits them into per-expert views, so DCP reads and writes in place and
a save at any world size and strategy loads at any other (DCP dedups ddp's replicated rows).
The first (v1) runtime wrote this layout too (tests/fixtures/ckpt_v1_fssdp_w2).

Legend: E experts of a bank, R rows of a bank this rank holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

# fqn of a stacked bank parameter -> (the R rows this rank holds, their global expert ids)
ExpertRows = Callable[[str, Tensor], tuple[Tensor, Sequence[int]]]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ExpertStateDict:
    """Converts (model, optimizer) state to and from the shared layout."""

    def __init__(self, model: nn.Module, expert_fqns: list[str], rows: ExpertRows) -> None:
        self.model = model
        self.fqns = expert_fqns  # every stacked bank parameter, by FQN
        self.rows = rows

    def _experts(self, msd: dict[str, Any], osd: dict[str, Any]) -> dict[str, Any]:
        """Per-expert views of the expert entries of (msd, osd), which are removed from them."""
        params: dict[str, Tensor] = {}
        optim: dict[str, Tensor] = {}
        step = 0
        for fqn in self.fqns:
            rows_R, ids = self.rows(fqn, msd.pop(fqn))
            rows_R = rows_R.detach()
            params.update({f"{fqn}.{e}": rows_R[i] for i, e in enumerate(ids)})
            st = osd["state"].pop(fqn, None)
            if st is None:
                raise ValueError(f"optimizer has no state for expert parameter {fqn}")
            for key, value in st.items():
                local = _local(value).detach() if isinstance(value, Tensor) else value
                if isinstance(local, Tensor) and local.ndim >= 1 and len(local) == len(rows_R):
                    optim.update({f"{fqn}.{e}.{key}": local[i] for i, e in enumerate(ids)})
                elif key == "step":
                    step = max(step, int(local))
        drop = set(self.fqns)
        for group in osd["param_groups"]:
            group["params"] = [p for p in group["params"] if p not in drop]
        return {"params": params, "optim": optim, "step": step}

    def state_dict(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, opt)
        experts = self._experts(msd, osd)
        return {"model": msd, "optim": osd, "experts": experts}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any], opt: torch.optim.Optimizer) -> None:
        """Load what DCP read into `sd` (a structure from `state_dict`).

        Expert entries of `sd` are views of the live rows (DCP loaded them in place); they are
        copied only where a caller passed other tensors. The current optimizer's param groups
        are kept: their hyper-parameters come from the config (lr from the schedule).
        """
        msd, osd = get_state_dict(self.model, opt)
        mine = self._experts(dict(msd), {"state": dict(osd["state"]), "param_groups": []})
        for part in ("params", "optim"):
            for key, dst in mine[part].items():
                src = sd["experts"][part][key]
                if src is not dst:
                    dst.copy_(src)
        msd.update(sd["model"])
        osd["state"].update(sd["optim"]["state"])
        for fqn in self.fqns:
            st = osd["state"].get(fqn, {})
            if isinstance(st.get("step"), Tensor):
                st["step"] = torch.full_like(st["step"], float(sd["experts"]["step"]))
        set_state_dict(self.model, opt, model_state_dict=msd, optim_state_dict=osd)


def expert_param_fqns(model: nn.Module) -> list[str]:
    """FQNs of every stacked bank parameter of `model` (`<bank>.<pname>`)."""
    from models.common.experts import ExpertBank

    return [
        f"{name}.{pname}"
        for name, mod in model.named_modules()
        if isinstance(mod, ExpertBank)
        for pname, _ in mod.named_parameters(recurse=False)
    ]
