"""Entry point: `torchrun --nproc_per_node N -m launch.train <hydra overrides>`.

`python -m launch.train …` without torchrun runs as world 1. The config is composed with hydra's
compose API (not `@hydra.main`) so that every rank agrees on one run directory and bad input ends
with one clear line and exit code 2 instead of a hydra traceback.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from launch import checkpoint as ckpt
from launch import cli
from launch.build import build_trainer
from launch.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from launch.ckpt_errors import FALLBACK_KINDS, config_change
from launch.data.meta import resolve_token_meta
from launch.dist import on_main, peer_failure, report_failure
from launch.errors import EXIT_USER_ERROR, UserError, fail, os_error_line
from launch.lock import LOCK_NAME, acquire, release_held, visible
from launch.validation import check_known_keys, resume_mode, validate


def compose_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """Compose the job config; return it and the (unresolved-by-rank) run directory."""
    job, run_dir, _ = compose(overrides)
    return job, run_dir


def compose(overrides: list[str]) -> tuple[DictConfig, str, str]:
    """(job config, run directory, sweep directory) of `overrides`."""
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
    run_dir, sweep_dir = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    check_known_keys(cfg)
    resolve_token_meta(cfg, overrides)  # data=tokens data.path=<prepare_data dir>
    return cfg, run_dir, sweep_dir


def run(job: DictConfig, run_dir_hint: str) -> None:
    from launch.dist import init_distributed
    from launch.summary import print_summary, start_lines

    cfg: Any = OmegaConf.to_object(job)
    # Before the rendezvous: a config the world cannot host fails on every rank at once.
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    mode = resume_mode(cfg.train.resume)
    info = init_distributed(cfg.parallel.timeout_s)
    if not cfg.parallel.ranks_per_node:
        check_nodes_agree(info.ranks_per_node)
    run_dir = Path(_agree(run_dir_hint))
    record = on_main(lambda: take_run_dir(run_dir, mode), info.is_main)
    check_shared(run_dir, record, info)
    check_resume(run_dir, mode, cfg.train)
    if info.is_main:
        print("\n".join(start_lines(cfg, info.world_size, run_dir)), flush=True)
    quiet_moeut_view_warning()
    trainer = build_trainer(cfg, info, run_dir)
    if mode != "false":
        resumed = resume(trainer, cfg, job, run_dir)
        if resumed is None:  # lines of an attempt that died before its first checkpoint
            trainer.metrics.truncate_after(0)
        if info.is_main and (resumed is not None or mode == "true"):
            print(f"resumed from step {resumed}" if resumed else "no checkpoint: starting fresh")
    text = OmegaConf.to_yaml(job)
    on_main(lambda: write_config(run_dir, text), info.is_main)
    if info.is_main:
        print(topology_line(trainer.par, info), flush=True)
    history = trainer.fit()
    if info.is_main:
        print_summary(run_dir, history)


# [Note: FSDP2's view warning]
# FSDP2 warns when a wrapped module returns a view: an in-place op on it would bypass the
# pre-backward hook FSDP registers on the output. MoEUT's root module returns
# `lm_head(out_norm(x))`, an nn.Linear with bias on a [B, S, D] input, which torch computes as
# addmm on [B*S, D] and returns as a view of that fresh [B*S, V] result (the other families'
# heads return an _unsafe_view, which is no view). That view is of the forward's own
# intermediate, not of an input or a parameter, and its one consumer, lm_loss, is out of place
# (flatten, cast, cross_entropy), so the hook fires and the gradients are right (the parity
# tests compare them with the single-process reference). models/ is not changed for a warning:
# it is silenced for exactly that module's message.
def quiet_moeut_view_warning() -> None:
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module \(FSDPMoEUT\) returned a view tensor",
        category=UserWarning,
        module=r"torch\.distributed\.fsdp\._fully_shard\._fsdp_state",
    )


def take_run_dir(run_dir: Path, mode: str) -> dict[str, Any]:
    """Rank 0: lock the run directory for this job (launch/lock.py), creating it; returns the
    lock's record."""
    if mode == "true" and not (run_dir / "checkpoints").is_dir():  # before creating anything
        raise UserError(
            f"train.resume=true but {run_dir / 'checkpoints'} does not exist: pass the run's "
            "directory as hydra.run.dir=<run dir>"
        )
    try:
        held = acquire(run_dir)
        ckpt.recover_interrupted(run_dir / "checkpoints")
        return held.record
    except OSError as e:
        what = f"cannot use run directory {run_dir} (hydra.run.dir)"
        raise UserError(os_error_line(e, what)) from e


def check_shared(run_dir: Path, record: dict[str, Any], info: Any) -> None:
    """Every node must see rank 0's run directory: all ranks write checkpoints into it, and a
    node-local directory would yield checkpoints with other nodes' files missing."""
    problem = None
    if info.local_rank == 0 and not info.is_main and not visible(run_dir / LOCK_NAME, record):
        problem = (
            f"rank {info.rank} on host {socket.gethostname()} does not see {run_dir / LOCK_NAME} "
            f"that rank 0 wrote on host {record.get('host')}: hydra.run.dir must be on a file "
            "system every node sees (README 'Multi-node')"
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        got: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(got, problem)
        problem = next((p for p in got if p), None)
    if problem:
        raise UserError(problem)


def check_resume(run_dir: Path, mode: str, t: Any) -> None:
    """Before any heavy work: the run directory and its checkpoints suit `mode`."""
    ckpts = run_dir / "checkpoints"
    found = latest_checkpoint(ckpts)
    if mode == "false" and found is not None:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest: step {found[0]}) and "
            "train.resume=false would overwrite them: use train.resume=auto to continue, "
            "or another hydra.run.dir to start fresh"
        )
    if t.resume_step:
        steps = {s: p for s, p in list_checkpoints(ckpts)}
        if t.resume_step not in steps:
            raise UserError(
                f"train.resume_step={t.resume_step}: {ckpts} has no checkpoint of that step "
                f"(saved: {', '.join(map(str, steps)) or 'none'}): pick one of those"
            )
        found = (t.resume_step, steps[t.resume_step])
    if mode != "false" and found is not None and not t.resume_fallback:
        try:  # sizes only, cheap; checksums and what only loading reveals: Trainer.resume
            ckpt.verify_checkpoint(found[1], checksums=False)
        except CheckpointError as e:
            hint = f": {ckpt.FALLBACK_HINT}" if e.kind in FALLBACK_KINDS else ""
            raise UserError(f"{e}{hint}") from e


def resume(trainer: Any, cfg: Any, job: DictConfig, run_dir: Path) -> int | None:
    """Trainer.resume; a checkpoint that does not fit this config names the keys that differ
    from the run's config.yaml."""
    try:
        return trainer.resume(fallback=cfg.train.resume_fallback, step=cfg.train.resume_step)
    except CheckpointError as e:
        if e.kind != "mismatch":
            raise
        current = OmegaConf.to_container(job)
        raise UserError(f"{e}; {config_change(run_dir, current)}") from e  # type: ignore[arg-type]


def write_config(run_dir: Path, text: str) -> None:
    """config.yaml describes the run's checkpoints: a resume with another config keeps it and
    writes the new one beside it as config.resume.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.exists() and latest_checkpoint(run_dir / "checkpoints") is not None:
        if path.read_text() != text:
            (run_dir / "config.resume.yaml").write_text(text)
        return
    path.write_text(text)


def check_nodes_agree(ranks_per_node: int) -> None:
    """Every node must run the same number of ranks: the topology is nodes × ranks_per_node."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, ranks_per_node)
    if len(set(got)) > 1:
        raise UserError(
            f"nodes run different numbers of ranks ({sorted(set(got))}): start every node with "
            "the same --nproc_per_node, or set parallel.ranks_per_node"
        )


def topology_line(par: Any, info: Any) -> str:
    """The topology the planner and dispatcher use (fssdp/ep), else the launcher's layout."""
    topo = getattr(par, "topology", None)
    if topo is not None:
        world, rpn, src = topo.world_size, topo.ranks_per_node, "planner and dispatcher"
    else:
        world, rpn, src = info.world_size, info.ranks_per_node or info.world_size, "launcher"
    nodes = world // rpn
    line = (
        f"topology: {nodes} node{'s' if nodes != 1 else ''} x {rpn} rank{'s' if rpn != 1 else ''}"
        f" per node (world {world}; {src})"
    )
    links = getattr(par, "links", None)  # fssdp's probe ([Note: copies per link])
    if links is not None and links.degree_bandwidth > 0:
        measured = [f"{k}-node {v / 1e9:.3g} GB/s" for k, v in vars(links).items() if v < math.inf]
        line += f"; expert copies measured at {', '.join(measured)}"
    return line


# Text of the backends' errors when a peer stops answering (gloo, NCCL, the TCP store).
_LOST_PEER = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def distributed_failure(err: BaseException) -> str | None:
    """One line for a collective that timed out or lost its peer; None for anything else."""
    from collectives.comm import CollectiveError

    text = " ".join(str(err).split())
    if not isinstance(err, CollectiveError):
        if not any(k in text.lower() for k in _LOST_PEER):
            return None
        rank = dist.get_rank() if dist.is_initialized() else 0
        text = f"rank {rank}: {text}"
    return (
        f"{text[:300]} [in {_where(err)}]: a rank stopped answering or died; check the other "
        "ranks' output, or raise parallel.timeout_s if a step is legitimately that slow"
    )


def _where(err: BaseException) -> str:
    """The innermost frame of the training code (launch/, fssdp/) the error went through."""
    root = Path(__file__).resolve().parent.parent
    frames = []
    for f in traceback.extract_tb(err.__traceback__):
        path = Path(f.filename).resolve()
        if path.is_relative_to(root) and path.relative_to(root).parts[0] in ("launch", "fssdp"):
            frames.append(f)
    if not frames:
        return "startup"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.name}: {(f.line or '').strip()}"


def _agree(run_dir: str) -> str:
    """Every rank uses rank 0's run directory (timestamps can differ across processes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return run_dir
    obj = [run_dir]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _leave_together() -> None:
    """After a run that ended well: one barrier before the process groups are torn down, so no
    rank closes its connections while a peer still finishes its last collectives. (The crash once
    blamed on that, "terminate called without an active exception" after a finished run, is the
    finalization race of [Note: leaving without finalization] in launch/leave.py.)"""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = cli.parse(args)
        if command.kind != "train":
            answer(command)
            return
        job, run_dir = compose_config(command.overrides)
        run(job, run_dir)
        _leave_together()
    except UserError as e:
        _stop(str(e))
    except OSError as e:  # a file-system error anywhere (full disk, ESTALE, read-only, removed)
        _stop(os_error_line(e))
    except RuntimeError as e:  # CollectiveError and the backends' timeout / lost-peer errors
        line = peer_failure() or distributed_failure(e)
        if line is None:
            raise
        # A peer stopped answering: tearing down the process groups (or the interpreter, whose
        # destructors join gloo's in-flight work) can block on it or abort (seen: a hang, and
        # "terminate called without an active exception"). Say the one line and leave now;
        # checkpoints are already complete (written to a temporary name, then renamed).
        print(f"fssdp: error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        release_held()
        os._exit(EXIT_USER_ERROR)
    finally:
        release_held()
        if dist.is_initialized():
            dist.destroy_process_group()


def answer(command: cli.Command) -> None:
    """--help, --hydra-help, --cfg job (printed by rank 0 only), or a -m sweep."""
    quiet = os.environ.get("RANK", "0") != "0"
    if command.kind == "multirun":
        multirun(command.overrides)
    elif command.kind == "cfg":
        job, _ = compose_config(command.overrides)
        text = OmegaConf.to_yaml(job)
    else:
        text = cli.help_text() if command.kind == "help" else cli.HYDRA_HELP.strip()
    if command.kind != "multirun" and not quiet:
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - interpreter exit flushes it


def multirun(overrides: list[str]) -> None:
    """Every combination of the sweep, one run after the other in this process; run n in
    <hydra.sweep.dir>/<n>. Under torchrun every rank expands the same argv to the same list, and
    each run takes rank 0's directory (_agree), so the ranks agree on the sweep's runs."""
    jobs = cli.sweep(overrides)
    first, _, sweep_dir = compose(jobs[0])  # the sweep directory is composed once
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one list and one directory
        from launch.dist import init_distributed

        init_distributed(first.parallel.timeout_s)
        got: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(got, jobs)
        if any(g != jobs for g in got):
            raise UserError("the ranks expanded the sweep differently: start every rank with "
                            "the same arguments")  # fmt: skip
        sweep_dir = _agree(sweep_dir)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"sweep: {len(jobs)} runs in {sweep_dir}", flush=True)
    for n, job_overrides in enumerate(jobs):
        varied = [o for o in job_overrides if o not in overrides]
        if main_rank:
            print(f"sweep run {n}: {' '.join(varied) or '(no sweep keys)'}", flush=True)
        job, _ = compose_config([*job_overrides, f"hydra.run.dir={sweep_dir}/{n}"])
        run(job, f"{sweep_dir}/{n}")
        release_held()  # this run's directory lock


def _stop(message: str) -> None:
    """This rank's one line: left in the store for the other ranks, then printed; exit 2."""
    if not re.match(r"rank \d+ failed: ", message):  # its own failure, not one it relays
        report_failure(message)
    release_held()
    fail(message)


if __name__ == "__main__":
    from launch.leave import run_main

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_main(main)
