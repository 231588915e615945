"""Parameter counts: total, and active (what one token uses).

A token uses every dense parameter and, of each expert bank, the experts it is routed to.
`experts_per_token` finds that number from the modules that route into each bank, by the
zoo's conventions: a module whose `experts` is the bank routes each token to its `top_k`
(or `router.top_k`) experts; attention expert banks (`v`, `o`, `q` of SwitchHead / MoA) take
`top_k` experts per head (`n_heads` heads when each head has its own experts); a bank shared by
two sub-layers (UMoE) takes the sum of their `top_k`, capped at E. A bank no rule covers counts
as fully active (an upper bound).
"""

from __future__ import annotations

from torch import nn

from models.common.experts import ExpertBank


def _k(mod: nn.Module) -> int | None:
    k = getattr(mod, "top_k", None)
    if k is None:
        k = getattr(getattr(mod, "router", None), "top_k", None)
    return int(k) if k is not None else None


def experts_per_token(model: nn.Module) -> dict[str, int]:
    """Bank name -> experts of that bank one token uses."""
    per: dict[str, int] = {}
    for mod in model.modules():
        k = _k(mod)
        for attr in ("experts", "v", "o", "q"):
            bank = getattr(mod, attr, None)
            if not isinstance(bank, ExpertBank) or k is None:
                continue
            per_head = attr != "experts" and hasattr(mod, "n_exp")  # SwitchHead: A per head
            use = k * getattr(mod, "n_heads", 1) if per_head else k
            per[bank.bank_name] = min(bank.num_experts, per.get(bank.bank_name, 0) + use)
        for sub in ("att", "ffn"):  # a bank handed to two routed sub-layers (UMoE)
            bank = getattr(mod, "experts", None)
            child = getattr(mod, sub, None)
            if isinstance(bank, ExpertBank) and child is not None and _k(child) is not None:
                k_sub = _k(child)
                assert k_sub is not None
                per[bank.bank_name] = min(bank.num_experts, per.get(bank.bank_name, 0) + k_sub)
    return per


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters of an unsharded model (meta is fine: nothing is read)."""
    total = sum(p.numel() for p in model.parameters())
    per = experts_per_token(model)
    idle = 0
    for mod in model.modules():
        if isinstance(mod, ExpertBank):
            k = per.get(mod.bank_name, mod.num_experts)
            one = sum(p[0].numel() for p in mod.parameters(recurse=False)) if mod.num_experts else 0
            idle += (mod.num_experts - k) * one
    return total, total - idle
