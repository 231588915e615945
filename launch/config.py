"""The hydra schema: structured configs registered in the ConfigStore; YAML only composes.

Groups: model/ (every `<family>_<size>` preset), parallel/ (none|ddp|fsdp|ep|fssdp),
data/ (pystdlib|tokens|synthetic), optim/ (adamw|adam|sgd|adafactor: `optim.name`), train/
(default). Unknown keys fail.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fssdp.config import ParallelConfig, strategy_names
from launch.data import DataConfig
from launch.optim import OPTIMIZERS, OptimConfig
from launch.trainer import TrainConfig
from models.registry import model_presets


@dataclass
class Config:
    model: Any = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0  # the global batch of step s is drawn from (seed, s)


DATA_SOURCES = ("pystdlib", "tokens", "synthetic")


def register_configs() -> None:
    """Store the schema, presets and groups in hydra's ConfigStore. Storing converts every
    dataclass to a structured config (~0.3 s), so it runs once per set of registered
    strategies and presets (one registered later, by a test for instance, stores them again)."""
    _register(tuple(strategy_names()), tuple(model_presets()))


@functools.cache
def _register(strategies: tuple[str, ...], presets: tuple[str, ...]) -> None:
    cs = ConfigStore.instance()
    cs.store(name="fssdp_schema", node=Config)
    for name, cfg in model_presets().items():
        cs.store(group="model", name=name, node=cfg)
    for strategy in strategies:
        cs.store(group="parallel", name=strategy, node=ParallelConfig(strategy=strategy))
    for source in DATA_SOURCES:
        cs.store(group="data", name=source, node=replace(DataConfig(), name=source))
    for name in OPTIMIZERS:
        cs.store(group="optim", name=name, node=OptimConfig(name=name))
    cs.store(group="train", name="default", node=TrainConfig)


def group_options(group: str) -> list[str]:
    if group == "experiment":  # YAML files in configs/experiment/, not structured configs
        from importlib.resources import files

        folder = files("configs") / "experiment"
        names = [p.name for p in folder.iterdir()]
        return sorted(n.removesuffix(".yaml") for n in names if n.endswith(".yaml"))
    return sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().list(group))
