"""Sparse collective algorithms: the protocol and registry (base.py) and one module per
algorithm, each registering one class. Every module of this package is imported here, sorted by
name, so adding an algorithm is adding a module (collectives/README.md)."""

import importlib
import pkgutil

from collectives.algorithms.base import (
    Algorithm,
    Finish,
    algorithm_costs,
    candidates,
    choose,
    choose_algorithm,
    get,
    names,
    register,
    unregister,
)


def _import_all() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


_import_all()

__all__ = [
    "Algorithm",
    "Finish",
    "algorithm_costs",
    "candidates",
    "choose",
    "choose_algorithm",
    "get",
    "names",
    "register",
    "unregister",
]
