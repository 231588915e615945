"""Strategies register themselves by name; `parallel=<name>` looks them up here.

Adding a strategy: a module in `fssdp/strategies/` with a `Parallelized` subclass decorated
`@register("name")` (fssdp/README.md). Modules in this package are discovered on first lookup,
so nothing else has to be edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from fssdp.strategies.base import Parallelized

T = TypeVar("T", bound=type)
_STRATEGIES: dict[str, type[Parallelized]] = {}
_SKIP = {"base", "registry", "__init__"}


def register(name: str):  # noqa: ANN201
    """Class decorator: make a `Parallelized` subclass available as `parallel=<name>`."""

    def deco(cls: T) -> T:
        if name in _STRATEGIES and _STRATEGIES[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        _STRATEGIES[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def _discover() -> None:
    import fssdp.strategies as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _SKIP:
            importlib.import_module(f"fssdp.strategies.{mod.name}")


def strategy_names() -> list[str]:
    _discover()
    return sorted(_STRATEGIES)


def strategy(name: str) -> type[Parallelized]:
    _discover()
    if name not in _STRATEGIES:
        raise ValueError(f"parallel={name}: unknown strategy; choose one of {strategy_names()}")
    return _STRATEGIES[name]
