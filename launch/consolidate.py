"""Rebuild a plain, single-process model from a run directory's checkpoint, whatever strategy
wrote it: dense parameters are stored by FQN, FSSDP/EP experts by global (bank, expert)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn

from launch.checkpoint import latest_checkpoint
from launch.errors import UserError
from models.common.experts import ExpertBank


def load_run_config(run_dir: Path) -> Any:
    from launch.config import Config, register_configs

    path = run_dir / "config.yaml"
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run directory written by launch.train")
    register_configs()
    raw = OmegaConf.load(path)
    from models.registry import model_specs

    family = raw.model.family
    specs = model_specs()
    if family not in specs:
        raise UserError(f"{path}: unknown model family {family!r}")
    model_cfg = OmegaConf.merge(OmegaConf.structured(specs[family].config_cls), raw.model)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    cfg.model = model_cfg  # typed: the family's dataclass, not a plain dict
    return OmegaConf.to_object(cfg)


def load_full_model(run_dir: Path, step: int | None = None) -> tuple[nn.Module, Any, int]:
    """(model on CPU in eval mode, run config, checkpoint step)."""
    from models.registry import build_model

    cfg = load_run_config(run_dir)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise UserError(
            f"no checkpoint in {run_dir}/checkpoints: train with train.ckpt_every "
            "or to the end first"
        )
    ckpt_step, path = found
    torch.manual_seed(0)
    model = build_model(cfg.model)
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    plain: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    banks = {m.bank_name: m for m in model.modules() if isinstance(m, ExpertBank)}
    for name, p in model.named_parameters():
        if f"app.model.{name}" in meta:
            plain[name] = torch.empty_like(p)
            continue
        bank_name, _, pname = name.rpartition(".")
        if bank_name not in banks:
            raise UserError(f"checkpoint {path} has no entry for parameter {name}")
        for e in range(p.shape[0]):
            experts[f"{name}.{e}"] = torch.empty_like(p[0])
    state = {"app": {"model": plain, "experts": {"params": experts}}}
    if not experts:
        del state["app"]["experts"]
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): "
            "move it aside to use an earlier one"
        ) from e
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in plain:
                p.copy_(plain[name])
            else:
                p.copy_(torch.stack([experts[f"{name}.{e}"] for e in range(p.shape[0])]))
    return model.eval(), cfg, ckpt_step
