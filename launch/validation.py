"""Checks of a resolved config that need no heavy work: each failure is one line naming the fix."""

from __future__ import annotations

from typing import Any

from launch.errors import UserError


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
    resume_mode(t.resume)
    if t.ckpt_every < 0 or t.keep_last < 0:
        raise UserError(
            "train.ckpt_every and train.keep_last must be ≥ 0 (0: only at the end / all)"
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
    if p.timeout_s <= 0:
        raise UserError(f"parallel.timeout_s={p.timeout_s}: use a positive number of seconds")
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
