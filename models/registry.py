"""The zoo by name: every model module registers its own `ModelSpec` (models/spec.py).

`model=<family>_<size>` in hydra resolves to a preset config from here. The zoo's
modules are found, not listed: every top-level module of the `models` package is imported once,
the first time a spec is needed, and registers its family (models/README.md, "Adding a model").
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace
from typing import Any

import torch
from torch import nn

import models
from models.common.experts import name_banks
from models.common.init import init_weights
from models.spec import ModelSpec, registered

__all__ = ["ModelSpec", "build_model", "model_presets", "model_specs", "preset", "spec_for"]

_NOT_FAMILIES = {"registry", "spec"}
_loaded = False


def _load_zoo() -> None:
    """Import every model module of the package once; each registers its spec on import."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(models.__path__):
        if not info.ispkg and info.name not in _NOT_FAMILIES:
            importlib.import_module(f"models.{info.name}")
    _loaded = True


def model_specs() -> dict[str, ModelSpec]:
    """Every registered family: name -> spec."""
    _load_zoo()
    return registered()


def spec_for(cfg: Any) -> ModelSpec:
    """The spec of a model config (by its `family` field)."""
    specs = model_specs()
    family = getattr(cfg, "family", None)
    if family not in specs:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(specs))}")
    return specs[family]


def model_presets() -> dict[str, Any]:
    """Every `<family>_<size>` preset config."""
    specs = model_specs().values()
    return {f"{s.name}_{size}": cfg for s in specs for size, cfg in s.presets.items()}


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
    spec = spec_for(cfg)
    with torch.device("meta"):
        model = spec.builder(cfg)
    name_banks(model)
    if dtype is not None:
        model = model.to(dtype)
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    init_weights(model, seed)
    return model
