"""Checks of a resolved config that need no heavy work: each failure is one line naming the fix.

Value ranges live in one rule table beside each config dataclass (`RULES` in fssdp/config.py,
launch/optim.py, launch/data/config.py; `TRAIN_RULES` in launch/trainer.py; helper:
fssdp/rules.py); `validate` runs them all, then the checks that involve several sections or the
world size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launch.errors import UserError


def rule_tables() -> list[tuple[str, tuple]]:
    """(section, rules) of every config dataclass that has a rule table."""
    from fssdp.config import RULES as PARALLEL
    from launch.data.config import RULES as DATA
    from launch.optim import RULES as OPTIM
    from launch.trainer import TRAIN_RULES

    return [("train", TRAIN_RULES), ("optim", OPTIM), ("data", DATA), ("parallel", PARALLEL)]


def validate(cfg: Any, world_size: int) -> None:
    """Checks that need no heavy work; each failure names the fix."""
    from fssdp.rules import RuleError
    from fssdp.rules import check as check_rules

    # A model family may declare RULES beside its config dataclass too (models/ owns them).
    tables = [*rule_tables(), ("model", getattr(type(cfg.model), "RULES", ()))]
    try:
        for section, rules in tables:
            check_rules(section, getattr(cfg, section), rules)
    except RuleError as e:
        raise UserError(str(e)) from e
    t = cfg.train
    if t.global_batch_size % world_size:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} does not split evenly over "
            f"{world_size} ranks: use a multiple of {world_size}"
        )
    if t.resume_step and resume_mode(t.resume) == "false":
        raise UserError(
            f"train.resume_step={t.resume_step} with train.resume=false: use train.resume=auto "
            "to resume from that step, or drop train.resume_step"
        )
    p = cfg.parallel
    if p.strategy == "none" and world_size > 1:
        raise UserError(
            f"parallel=none runs on one process but the world size is {world_size}: "
            "use parallel=ddp|fsdp|ep|fssdp under torchrun"
        )
    if p.ranks_per_node and world_size % p.ranks_per_node:
        raise UserError(
            f"parallel.ranks_per_node={p.ranks_per_node} does not divide the world size "
            f"{world_size}: use a divisor, or 0 (from torchrun)"
        )
    per_rank = t.global_batch_size // world_size
    if t.micro_batch_size and per_rank % t.micro_batch_size:
        raise UserError(
            f"train.micro_batch_size={t.micro_batch_size} does not divide the {per_rank} "
            f"sequences per rank (train.global_batch_size={t.global_batch_size} over "
            f"{world_size} ranks): use a divisor of {per_rank}"
        )
    if t.compile:
        import torch

        from fssdp.compiled import compile_problem

        problem = compile_problem("cuda" if torch.cuda.is_available() else "cpu")
        if problem is not None:
            raise UserError(problem)
    max_len = getattr(cfg.model, "max_seq_len", None)
    if max_len is not None and t.seq_len > max_len:
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={max_len}: lower train.seq_len"
        )


def resume_mode(value: Any) -> str:
    """`train.resume` as auto | true | false (hydra hands booleans over as True/False)."""
    mode = str(value).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise UserError(f"train.resume={value!r}: use auto, true or false")
    return mode


def check_known_keys(cfg: DictConfig, where: str = "") -> None:
    """Refuse keys that no config dataclass declares (`+train.foo=1` is accepted by hydra and
    would be written to config.yaml, yet nothing reads it: a typo that trains silently)."""
    kind = OmegaConf.get_type(cfg)
    if kind is not None and dataclasses.is_dataclass(kind):
        known = {f.name for f in dataclasses.fields(kind)}
        for key in cfg:
            if key not in known:
                name = f"{where}{key}"
                close = sorted(k for k in known if k[:3] == str(key)[:3])
                hint = f" (did you mean {where}{close[0]}?)" if close else ""
                raise UserError(
                    f"unknown config key {name}{hint}: see README 'Configuration' for the keys "
                    f"of {where.rstrip('.') or 'the config'}"
                )
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_known_keys(node, f"{where}{key}.")
