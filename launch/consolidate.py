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


def read_model_entries(path: Path) -> dict[str, Any]:
    """The model entries of checkpoint `path` ({"model": {fqn: t}, "experts": {"params":
    {"<bank>.<param>.<e>": t}}}), read in one process the way DCP's `dcp_to_torch_save` reads a
    whole checkpoint (tensors allocated from the metadata), but only these keys: the optimizer
    state, twice the model, is not read."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict[str, Any] = {}
    planner = _EmptyStateDictLoadPlanner(keys={"app.model", "app.experts.params"})
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        _load_state_dict(sd, dcp.FileSystemReader(str(path)), planner=planner, no_dist=True)
    return sd.get("app", {})


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Fill `model`'s parameters (CPU, unsharded) from checkpoint `path`, in one process.
    Experts are stored one entry per (bank, expert); checkpoints from before that layout hold
    each stacked bank under its FQN, which is used as it is."""
    try:
        verify_checkpoint(path)
        app = read_model_entries(path)
    except Exception as e:  # noqa: BLE001 - any failure here is the checkpoint's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"checkpoint {path} cannot be read ({first}): pass an earlier step or move it aside"
        ) from e
    plain, experts = app.get("model", {}), app.get("experts", {}).get("params", {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in plain:
                p.copy_(plain[name])
                continue
            rows = [experts.get(f"{name}.{e}") for e in range(p.shape[0])]
            if any(r is None for r in rows):
                raise UserError(
                    f"checkpoint {path} has no entry for {name}: it was written by another "
                    "model config (compare its run's config.yaml)"
                )
            p.copy_(torch.stack(rows))  # type: ignore[arg-type]


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
