"""The model↔runtime contract: a small typed spec per family (name, config, builder, sizes).

`model=<family>_<size>` in hydra resolves to a preset config from here (DESIGN.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from models.common.experts import name_banks


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


def build_model(cfg: Any) -> nn.Module:
    """Build the family's model from its config and name its expert banks."""
    specs = _specs()
    family = getattr(cfg, "family", None)
    if family not in specs:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(specs))}")
    model = specs[family].builder(cfg)
    name_banks(model)
    return model
