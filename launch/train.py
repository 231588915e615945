"""Entry point: `torchrun --nproc_per_node N -m launch.train <hydra overrides>`.

`python -m launch.train …` without torchrun runs as world 1. The config is composed with hydra's
compose API (not `@hydra.main`) so that every rank agrees on one run directory and bad input ends
with one clear line and exit code 2 instead of a hydra traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from launch.errors import UserError, fail


def compose_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """Compose the job config; return it and the (unresolved-by-rank) run directory."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from launch.config import group_options, register_configs

    register_configs()
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep:
            raise UserError(f"malformed override {ov!r}: write key=value (e.g. train.steps=100)")
        group = key.lstrip("+~")
        if group in ("model", "parallel", "data", "optim", "train") and value not in group_options(
            group
        ):
            raise UserError(
                f"unknown {group} {value!r}: choose one of {', '.join(group_options(group))}"
            )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="configs", version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - hydra/omegaconf raise many types for bad overrides
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"bad override ({first}); see README 'Configuration'") from e
    run_dir = str(cfg.hydra.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, run_dir


def validate(cfg: Any, world_size: int) -> None:
    """Checks that need no heavy work; each failure names the fix."""
    t = cfg.train
    if t.dtype not in ("float32", "float64", "bfloat16"):
        raise UserError(f"train.dtype={t.dtype!r}: use float32, float64 or bfloat16")
    if t.steps < 1 or t.global_batch_size < 1 or t.seq_len < 1:
        raise UserError("train.steps, train.global_batch_size and train.seq_len must be ≥ 1")
    if t.global_batch_size % world_size:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} does not split evenly over "
            f"{world_size} ranks: use a multiple of {world_size}"
        )
    max_len = getattr(cfg.model, "max_seq_len", None)
    if max_len is not None and t.seq_len > max_len:
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={max_len}: lower train.seq_len"
        )


def build_trainer(cfg: Any, info: Any, run_dir: Path, on_grads: Any = None) -> Any:
    """Everything a run needs, from a resolved config object; shared by `run` and the tests."""
    from fssdp.wrap import parallelize
    from launch.data import DataError, GlobalBatchSampler, build_streams, val_batches
    from launch.optim import build_optimizer
    from launch.trainer import Trainer, param_dtype
    from models.registry import build_model

    t = cfg.train
    try:
        validate(cfg, info.world_size)
        train_stream, val_stream = build_streams(cfg.data)
        if train_stream.vocab_size > cfg.model.vocab_size:
            raise UserError(
                f"data vocabulary {train_stream.vocab_size} exceeds model.vocab_size="
                f"{cfg.model.vocab_size}: raise model.vocab_size"
            )
        sampler = GlobalBatchSampler(
            train_stream, cfg.seed, t.global_batch_size, t.seq_len, info.rank, info.world_size
        )
        val_data = val_batches(
            val_stream,
            cfg.data,
            cfg.seed,
            t.global_batch_size,
            t.seq_len,
            info.rank,
            info.world_size,
        )
    except DataError as e:
        raise UserError(str(e)) from e
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device=info.device, dtype=param_dtype(t))
    try:
        par = parallelize(model, cfg.parallel, info.ranks_per_node)
    except ValueError as e:
        raise UserError(str(e)) from e
    opt = build_optimizer(par.named_optimizer_params(), cfg.optim)
    return Trainer(
        par,
        opt,
        sampler,
        val_data,
        t,
        cfg.optim,
        info,
        run_dir,
        bits_per_byte=cfg.data.name == "pystdlib",
        on_grads=on_grads,
    )


def run(job: DictConfig, run_dir_hint: str) -> None:
    from launch.dist import init_distributed
    from launch.summary import print_summary

    cfg: Any = OmegaConf.to_object(job)
    info = init_distributed(cfg.parallel.timeout_s)
    run_dir = Path(_agree(run_dir_hint))
    if cfg.train.resume and not (run_dir / "checkpoints").is_dir():
        raise UserError(
            f"train.resume=true but {run_dir}/checkpoints does not exist: pass the run's "
            "directory as hydra.run.dir=<run dir>"
        )
    trainer = build_trainer(cfg, info, run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(job))
    if cfg.train.resume:
        resumed = trainer.resume()
        if info.is_main:
            print(f"resumed from step {resumed}" if resumed else "no checkpoint: starting fresh")
    history = trainer.fit()
    if info.is_main:
        print_summary(run_dir, history)


def _agree(run_dir: str) -> str:
    """Every rank uses rank 0's run directory (timestamps can differ across processes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return run_dir
    obj = [run_dir]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        job, run_dir = compose_config(overrides)
        run(job, run_dir)
    except UserError as e:
        fail(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
