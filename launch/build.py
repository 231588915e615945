"""Assemble a run from a resolved config: data, model, parallel strategy, optimizer, trainer.

Shared by `launch.train` (the CLI) and the tests, which build trainers in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch.errors import UserError
from launch.validation import validate


def build_trainer(cfg: Any, info: Any, run_dir: Path, on_grads: Any = None) -> Any:
    """Everything a run needs, from a resolved config object; shared by `run` and the tests."""
    from fssdp.api import parallelize
    from fssdp.compiled import compile_dense
    from fssdp.precision import mixed_precision
    from fssdp.recompute import apply_checkpointing
    from launch.data import DataError, GlobalBatchSampler, build_streams, val_batches
    from launch.optim import build_optimizer
    from launch.trainer import DTYPES, Trainer, param_dtype
    from models.registry import build_model, spec_for

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
    try:  # on the meta device: each rank allocates only what it holds (par.materialize)
        model = build_model(cfg.model, device="meta", dtype=param_dtype(t))
    except ValueError as e:  # an impossible model config (e.g. top_k > num_experts)
        raise UserError(f"model config: {e}") from e
    try:
        units = spec_for(cfg.model).fsdp_units(model)
        with mixed_precision(DTYPES[t.dtype] if t.dtype == "bfloat16" else None):
            par = parallelize(
                model, cfg.parallel, units=units, ranks_per_node=info.ranks_per_node
            )
    except ValueError as e:
        raise UserError(str(e)) from e
    apply_checkpointing(model, units, t.activation_checkpointing)
    if t.compile:  # the dense submodules; the checkpointed units' forwards call them
        compile_dense(model)
    par.materialize(info.device, seed=cfg.seed)
    opt = build_optimizer(par.named_optimizer_params(), cfg.optim)
    par.attach(opt)
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
