"""The model↔runtime contract: a small typed spec per family, registered by the family's module.

Each model module ends with `register(ModelSpec(...))`; `models.registry` imports the zoo's
modules once and looks specs up by name (`model=<name>_<size>` in hydra). This
module imports nothing of the zoo, so a family can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: the children of the model's ModuleLists, outermost first, each once
    (a layer inside an earlier unit is not a unit of its own)."""
    found: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            for child in mod:
                if not any(child is m for unit in found for m in unit.modules()):
                    found.append(child)
    return found


@dataclass(frozen=True)
class ModelSpec:
    """name: the family (`cfg.family`, `model=<name>_<size>`); config_cls: its config dataclass;
    builder: config -> model (called under `torch.device("meta")` by `build_model`); presets:
    size -> config; fsdp_units: model -> the modules FSDP2 wraps one by one (the rest goes to
    the root unit)."""

    name: str
    config_cls: type
    builder: Callable[[Any], nn.Module]
    presets: dict[str, Any] = field(default_factory=dict)
    fsdp_units: Callable[[nn.Module], list[nn.Module]] = default_fsdp_units

    @property
    def family(self) -> str:
        return self.name


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family to the zoo (at its module's import); a second spec of the same name fails."""
    for size, cfg in spec.presets.items():
        if not isinstance(cfg, spec.config_cls) or getattr(cfg, "family", None) != spec.name:
            raise ValueError(
                f"preset {spec.name}_{size}: not a {spec.config_cls.__name__} of family "
                f"{spec.name!r}"
            )
    known = _SPECS.get(spec.name)
    if known is not None and known is not spec:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def registered() -> dict[str, ModelSpec]:
    """The specs registered so far (`models.registry.model_specs` loads the zoo first)."""
    return dict(_SPECS)
