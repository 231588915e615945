"""`python -m launch.eval <run dir> [--step N] [--data SRC] [--split val|train] [--tokens T]`:
the loss of a run's checkpoint over a stated number of tokens, at any world size.

World 1 in-process (`python -m launch.eval …`), or under torchrun with any strategy
(`torchrun --nproc_per_node N -m launch.eval … [--parallel fssdp]`). The model, strategy and
optimizer are built by the trainer's own code (launch/build.py) and the checkpoint is loaded as
a resume loads it (model and optimizer entries, strict), so any checkpoint loads at any world
size under any strategy. Nothing is written into the run directory.

Tokens: consecutive, non-overlapping windows of train.seq_len + 1 tokens from the start of the
split, in global batches of --batch sequences (rank r takes its slice of each), as many whole
batches as fit in --tokens: the same tokens at every world size. Prints the mean loss in nats per
token, bits per byte for byte-level data (pystdlib, prepare_data --tokenizer bytes), else the
perplexity.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch.errors import UserError, fail


def data_config(spec: str, cfg: Any) -> Any:
    """--data: a prepare_data directory, a token file (the run's dtype), pystdlib, synthetic."""
    from launch.data.meta import meta_file, read_meta

    d = cfg.data
    if spec in ("pystdlib", "synthetic"):
        return replace(d, name=spec, path=None, val_path=None)
    found = meta_file(spec)
    if found is not None:
        meta = read_meta(found)
        vocab, dtype = int(meta["vocab_size"]), str(meta["dtype"])
        return replace(d, name="tokens", path=spec, val_path=None, vocab_size=vocab,
                       token_dtype=dtype)  # fmt: skip
    if Path(spec).is_file():
        return replace(d, name="tokens", path=spec, val_path=None)
    raise UserError(f"--data {spec}: not pystdlib, synthetic, a prepare_data directory nor a file")


def eval_config(run_dir: Path, args: argparse.Namespace, world: int) -> Any:
    from launch.consolidate import load_run_config

    cfg = load_run_config(run_dir)
    if args.data:
        cfg.data = data_config(args.data, cfg)
    if args.parallel:
        cfg.parallel = replace(cfg.parallel, strategy=args.parallel)
    batch = args.batch or cfg.train.global_batch_size
    if batch < 1 or batch % world:
        raise UserError(f"--batch {batch} does not split over {world} ranks: use a multiple")
    cfg.train = replace(cfg.train, global_batch_size=batch, progress=False, phase_timing=False,
                        profile_steps=[], routing_trace=False, resume="auto")  # fmt: skip
    cfg.data = replace(cfg.data, val_batches=1)
    return cfg


def windows(stream: Any, seq_len: int, batch: int, tokens: int, rank: int, world: int) -> list:
    """This rank's (inputs, targets) of consecutive windows from the stream's start."""
    n = min(tokens, len(stream) - 1) // seq_len // batch * batch
    if n == 0:
        raise UserError(
            f"{stream.name} has {len(stream)} tokens: fewer than one batch of {batch} x "
            f"{seq_len + 1} (or --tokens is below {batch * seq_len}): lower --batch or use more "
            "data"
        )
    per = batch // world
    out = []
    for b in range(n // batch):
        starts = (b * batch + rank * per + np.arange(per)) * seq_len
        win = torch.from_numpy(np.asarray(stream.tokens[starts[:, None] + np.arange(seq_len + 1)],
                                          dtype=np.int64))  # fmt: skip
        out.append((win[:, :-1].contiguous(), win[:, 1:].contiguous()))
    return out


def evaluate(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every rank calls; returns what rank 0 prints."""
    import os

    from launch import checkpoint as ckpt
    from launch.build import build_trainer
    from launch.consolidate import find_checkpoint
    from launch.data import build_streams
    from launch.dist import init_distributed

    cfg = eval_config(run_dir, args, int(os.environ.get("WORLD_SIZE", "1")))
    step, path = find_checkpoint(run_dir, args.step)
    info = init_distributed(cfg.parallel.timeout_s)
    scratch = Path(tempfile.mkdtemp(prefix="fssdp-eval-"))  # the trainer's logs: not the run's
    try:
        trainer = build_trainer(cfg, info, scratch)
        ckpt.load_checkpoint(path, trainer._state(loading=path))  # model + optimizer, strict
        train_s, val_s = build_streams(cfg.data)
        stream = val_s if args.split == "val" else train_s
        batches = windows(stream, cfg.train.seq_len, cfg.train.global_batch_size, args.tokens,
                          info.rank, info.world_size)  # fmt: skip
        trainer.val_data = batches
        loss = trainer.validate()
        trainer.metrics.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "step": step,
        "loss": loss,
        "tokens": len(batches) * cfg.train.global_batch_size * cfg.train.seq_len,
        "stream": stream.name,
        "split_tokens": len(stream),
        "batches": len(batches),
        "cfg": cfg,
        "world": info.world_size,
        "is_main": info.is_main,
    }


def is_bytes(cfg: Any) -> bool:
    from launch.data.tokenizer import run_codec

    try:
        codec = run_codec(cfg)
    except UserError:
        return False
    return codec is not None and codec.is_bytes


def report(run_dir: Path, r: dict[str, Any]) -> str:
    cfg = r["cfg"]
    loss = r["loss"]
    unit = (f"{loss / math.log(2):.4f} bits per byte" if is_bytes(cfg)
            else f"perplexity {math.exp(min(loss, 700)):.2f}")  # fmt: skip
    return (
        f"eval: {run_dir} step {r['step']} ({cfg.model.family}, parallel={cfg.parallel.strategy}"
        f", world {r['world']}) on {r['stream']}\n"
        f"  {r['tokens']:,} tokens ({r['batches']} batches x {cfg.train.global_batch_size} x "
        f"{cfg.train.seq_len}; the split has {r['split_tokens']:,})\n"
        f"  loss {loss:.4f} nats/token | {unit}"
    )


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from launch.dist import peer_failure

    ap = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--data", default=None, help="prepare_data dir | token file | pystdlib | "
                    "synthetic (default: the run's data)")  # fmt: skip
    ap.add_argument("--split", choices=("val", "train"), default="val")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens to evaluate (65536)")
    ap.add_argument("--batch", type=int, default=0, help="global batch (the run's)")
    ap.add_argument("--parallel", default=None, help="strategy (default: the run's)")
    args = ap.parse_args(argv)
    try:
        if not (args.run_dir / "config.yaml").is_file():
            raise UserError(f"{args.run_dir} has no config.yaml: pass a run directory")
        result = evaluate(args.run_dir, args)
        if result["is_main"]:
            print(report(args.run_dir, result), flush=True)
    except UserError as e:
        fail(str(e))
    except RuntimeError:
        line = peer_failure()
        if line is None:
            raise
        fail(line)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from launch.leave import run_main

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_main(main)
