"""The model↔runtime contract: a small typed spec per family (name, config, builder, sizes).

`model=<family>_<size>` in hydra resolves to a preset config from here (DESIGN.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from models.common.experts import name_banks
from models.common.init import init_weights


@dataclass(frozen=True)
class ModelSpec:
    family: str
    config_cls: type
    builder: Callable[[Any], nn.Module]
    # size name -> preset config (a `config_cls` instance); `model=<family>_<size>`
    presets: dict[str, Any] = field(default_factory=dict)


def _specs() -> dict[str, ModelSpec]:
    # Imported here so that importing the registry stays cheap for callers that need one family.
    from models import gpt_moe

    specs = [gpt_moe.SPEC]
    for mod_name in ("moeut", "sut", "umoe", "jamba"):
        try:
            mod = __import__(f"models.{mod_name}", fromlist=["SPEC"])
        except ModuleNotFoundError as e:
            if e.name != f"models.{mod_name}":
                raise
            continue
        specs.append(mod.SPEC)
    return {s.family: s for s in specs}


def model_specs() -> dict[str, ModelSpec]:
    return _specs()


def model_presets() -> dict[str, Any]:
    """Every `<family>_<size>` preset config."""
    return {f"{s.family}_{size}": cfg for s in _specs().values() for size, cfg in s.presets.items()}


def preset(name: str, **overrides: Any) -> Any:
    presets = model_presets()
    if name not in presets:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(presets))}")
    return replace(presets[name], **overrides)


def build_model(
    cfg: Any,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the family's model on the meta device, name its expert banks, and (unless
    `device` is "meta") materialise it on `device` and initialise it from `seed`.

    `device=None` is torch's default device: CPU, or meta inside `with torch.device("meta")`
    (so counting parameters that way allocates nothing).

    Initial values depend only on (seed, module name) and (seed, bank, expert id)
    ([Note: sharded init] in models/common/init.py), never on the global RNG. With `dtype` the
    model is converted on meta first, so values are drawn directly in that dtype.
    """
    specs = _specs()
    family = getattr(cfg, "family", None)
    if family not in specs:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(specs))}")
    with torch.device("meta"):
        model = specs[family].builder(cfg)
    name_banks(model)
    if dtype is not None:
        model = model.to(dtype)
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    init_weights(model, seed)
    return model
