"""Rebuild a plain, single-process model from a run directory's checkpoint, whatever strategy and
world size wrote it: dense parameters are stored by FQN, experts by global (bank, expert)
([Note: checkpoint layout] in fssdp/checkpoint.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn

from fssdp.checkpoint import expert_param_fqns
from launch.checkpoint import list_checkpoints, verify_checkpoint
from launch.errors import UserError


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


def find_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, Path]:
    """The latest checkpoint of a run (or the one of `step`)."""
    found = list_checkpoints(run_dir / "checkpoints")
    if step is not None:
        found = [(s, p) for s, p in found if s == step]
        if not found:
            raise UserError(f"no checkpoint of step {step} in {run_dir}/checkpoints")
    if not found:
        raise UserError(
            f"no checkpoint in {run_dir}/checkpoints: train with train.ckpt_every "
            "or to the end first"
        )
    return found[-1]


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Fill `model`'s parameters (CPU, unsharded) from checkpoint `path`, in one process."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    banks = set(expert_param_fqns(model))
    plain: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        # Stacked bank entries under their FQN: checkpoints from before the shared layout.
        if name not in banks or f"app.model.{name}" in meta:
            plain[name] = torch.empty_like(p)
        else:
            for e in range(p.shape[0]):
                experts[f"{name}.{e}"] = torch.empty_like(p[0])
    state: dict[str, Any] = {"app": {"model": plain}}
    if experts:
        state["app"]["experts"] = {"params": experts}
    try:
        verify_checkpoint(path)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the checkpoint's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"checkpoint {path} cannot be read ({first}): pass an earlier step or move it aside"
        ) from e
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in plain:
                p.copy_(plain[name])
            else:
                p.copy_(torch.stack([experts[f"{name}.{e}"] for e in range(p.shape[0])]))


def load_full_model(run_dir: Path, step: int | None = None) -> tuple[nn.Module, Any, int]:
    """(model on CPU in eval mode, run config, checkpoint step); latest step unless given."""
    from launch.trainer import param_dtype
    from models.registry import build_model

    cfg = load_run_config(run_dir)
    ckpt_step, path = find_checkpoint(run_dir, step)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(param_dtype(cfg.train))  # the dtype the run trained in
    load_model_weights(model, path)
    return model.eval(), cfg, ckpt_step
