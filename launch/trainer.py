"""The training loop: one optimizer step per global batch, metrics, validation, checkpoints.

Legend: B this rank's sequences, S sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from fssdp.phases import PhaseTimer, time_routers
from fssdp.rules import Rule, RuleError, at_least, one_of
from fssdp.rules import check as check_rules
from fssdp.strategies.base import Parallelized
from launch import checkpoint as ckpt
from launch.ckpt_errors import FALLBACK_KINDS
from launch.data import DataError, GlobalBatchSampler
from launch.dist import DistInfo, batch_reducer
from launch.errors import UserError
from launch.gather import all_gather_rows
from launch.metrics import MetricsLogger, expert_load_imbalance, peak_rss_bytes
from launch.optim import OptimConfig, build_scheduler, restore_scheduler, scheduler_state
from launch.preempt import Preemption, stop_run
from launch.profile import StepProfiler, TraceRecorder, gather_phases
from launch.step import StepRunner, lm_loss, split_micro_batches
from models.common.context import MoEContext

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
BATCH_STATS = ("global", "micro_batch")
CHECKPOINTING = ("none", "full", "selective")


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, split evenly over ranks
    seq_len: int = 128
    dtype: str = "float32"  # float32 | float64 | bfloat16 (bf16 autocast, fp32 master weights)
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end
    ckpt_every: int = 0  # 0: checkpoint only at the end
    # false: write no checkpoint at all, not at the end nor on preemption (benchmarks, smoke
    # runs: a GPT-MoE bench run's final save is ~2 s and 0.4 GB); resuming still reads them.
    checkpoints: bool = True
    keep_last: int = 3  # checkpoints kept (0 = all)
    # auto: continue from the run directory's latest checkpoint when one exists (what a
    # torchrun restart needs); true: require the checkpoints folder; false: start fresh
    resume: str = "auto"
    resume_fallback: bool = False  # an unusable latest checkpoint: set it aside, load the previous
    # Resume from this step's checkpoint instead of the latest (0: the latest); the checkpoints
    # after it are kept aside as step_….rolled_back (e.g. after a NaN stop, with a lower lr).
    resume_step: int = 0
    progress: bool = True  # rank-0 progress line at every log step
    phase_timing: bool = True  # per-rank phase times and spans of every logged step
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: torch.profiler, steps a..b
    routing_trace: bool = False  # rank 0 writes <run>/routing_trace.jsonl (tokens per expert)
    # Labelled tensorboard load figures per run (launch/metrics.py), drawn by rank 0 while the
    # others wait (0.55 s each for gpt_moe_bench's 8 banks x 16 experts); 0: none (benchmarks).
    load_figures: int = 8
    # -- pretraining switches (launch/step.py, fssdp/recompute.py, launch/preempt.py) --
    # Sequences per rank per micro-batch (gradient accumulation; 0: the whole per-rank batch).
    micro_batch_size: int = 0
    # Statistics of the losses under accumulation: global (exact full-batch losses, one no-grad
    # pre-pass per step) | micro_batch (per micro-batch, no pre-pass; Megatron-LM's default).
    batch_stats: str = "global"
    # Recompute activations in backward, per FSDP unit: none | full | selective (the expert
    # banks' activations are kept: no second token all-to-all).
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile the dense submodules (those without an expert bank)

    def __post_init__(self) -> None:  # also checked here: to_object callers get it too
        try:
            check_rules("train", self, [r for r in TRAIN_RULES if r.key == "profile_steps"])
        except RuleError as e:
            raise UserError(str(e)) from e


def _profile_ok(p: Any, cfg: TrainConfig) -> bool:
    p = list(p)
    return not p or (len(p) == 2 and 1 <= p[0] <= p[1] <= cfg.steps)


def _micro_ok(v: Any, cfg: TrainConfig) -> bool:
    return isinstance(v, int) and v >= 0 and (v == 0 or cfg.global_batch_size % v == 0)


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
TRAIN_RULES = (
    at_least("steps", 1, "e.g. {key}=200"),
    at_least("global_batch_size", 1, "e.g. {key}=16"),
    at_least("seq_len", 1, "e.g. {key}=128"),
    one_of("dtype", DTYPES, "e.g. {key}=float32"),
    at_least("log_every", 1, "e.g. {key}=10"),
    at_least("val_every", 0, "e.g. {key}=100", note="0 = only at the end"),
    at_least("ckpt_every", 0, "e.g. {key}=100", note="0 = only at the end"),
    at_least("keep_last", 0, "e.g. {key}=3", note="0 = keep all"),
    at_least("load_figures", 0, "e.g. {key}=8", note="0 = none"),
    Rule(
        "resume",
        lambda v, _: str(v).strip().lower() in ("auto", "true", "false"),
        "auto | true | false",
        "e.g. {key}=auto",
        "maybe",
    ),
    at_least("resume_step", 0, "e.g. {key}=100 (a step in <run>/checkpoints)", note="0 = latest"),
    Rule(
        "profile_steps",
        _profile_ok,
        "two steps [a,b] with 1 ≤ a ≤ b ≤ train.steps",
        "e.g. {key}=[3,5]",
        [0, 1],
    ),
    Rule(
        "micro_batch_size",
        _micro_ok,
        "≥ 0 and a divisor of train.global_batch_size, 0 = no accumulation",
        "e.g. {key}=4 (sequences per rank per micro-batch)",
        -1,
    ),
    one_of("batch_stats", BATCH_STATS, "e.g. {key}=global"),
    one_of("activation_checkpointing", CHECKPOINTING, "e.g. {key}=selective"),
)


def param_dtype(cfg: TrainConfig) -> torch.dtype:
    """Parameters are fp32 under bf16 autocast, else the configured dtype."""
    return torch.float32 if cfg.dtype == "bfloat16" else DTYPES[cfg.dtype]


class ModelOptimState(Stateful):
    """Model and optimizer state for DCP; the strategy decides the keys (FQNs for dense
    parameters, global (bank, expert) for sharded experts)."""

    def __init__(self, par: Parallelized, opt: torch.optim.Optimizer) -> None:
        self.par, self.opt = par, opt

    def state_dict(self) -> dict[str, Any]:
        return self.par.checkpoint.state_dict(self.opt)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.par.checkpoint.load_state_dict(sd, self.opt)


def peak_cuda_bytes(device: torch.device) -> int | None:
    """This rank's peak CUDA memory allocated by tensors; None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(device))


class Trainer:
    def __init__(
        self,
        par: Parallelized,
        opt: torch.optim.Optimizer,
        sampler: GlobalBatchSampler,
        val_data: list[tuple[Tensor, Tensor]],
        train_cfg: TrainConfig,
        optim_cfg: OptimConfig,
        info: DistInfo,
        run_dir: Path,
        bits_per_byte: bool,
        on_grads: Callable[[Parallelized, int], None] | None = None,
    ) -> None:
        self.par, self.opt, self.sampler, self.val_data = par, opt, sampler, val_data
        self.cfg, self.optim_cfg, self.info, self.run_dir = train_cfg, optim_cfg, info, run_dir
        self.bits_per_byte = bits_per_byte
        # Called with the synchronised, unclipped gradients of each step (parity tests, debugging).
        self.on_grads = on_grads
        self.reducer = batch_reducer()
        self.step = 0  # optimizer steps taken
        self.ckpt_root = run_dir / "checkpoints"
        self.metrics = MetricsLogger(
            run_dir, info.is_main, train_cfg.steps, train_cfg.progress, train_cfg.load_figures
        )
        self.history: list[dict[str, Any]] = []  # rank 0's logged records (for the summary)
        self.scheduler = build_scheduler(opt, train_cfg.steps, optim_cfg)  # warm-up + cosine
        self._owners: Any = None  # the expert owners last logged (ep, fssdp)
        self._init_profiling()
        self.runner = StepRunner(
            par, self.reducer, lm_loss, self._autocast, self.phases, train_cfg.batch_stats
        )

    def _init_profiling(self) -> None:
        """Phase timer (fssdp/phases.py), torch.profiler window, routing trace (launch/profile)."""
        cfg, info = self.cfg, self.info
        self.phases = PhaseTimer(info.device)
        if cfg.phase_timing:
            self.par.instrument(self.phases)
            time_routers(self.par.model, self.phases)
        self.profiler = StepProfiler(list(cfg.profile_steps), self.run_dir, info.rank, info.device)
        self.trace: TraceRecorder | None = None
        if cfg.routing_trace and info.is_main:
            tokens = cfg.global_batch_size * cfg.seq_len
            self.trace = TraceRecorder(self.run_dir, self.par.model, info.world_size, tokens)
            self.trace.expert_bytes = self.par.expert_bytes()

    def will_log(self, step: int) -> bool:
        """Whether step `step` (1-based) gets a metrics record (and so phase timing)."""
        c = self.cfg
        return (
            step == 1
            or step % c.log_every == 0
            or step == c.steps
            or bool(c.val_every and step % c.val_every == 0)
        )

    # -- state -------------------------------------------------------------------------------
    def _state(self, loading: Path | None = None) -> dict[str, Any]:
        return {
            "app": ModelOptimState(self.par, self.opt),
            "sampler": self.sampler.state_dict(),
            "scheduler": scheduler_state(self.scheduler, self.step, loading),
            "rng": torch.get_rng_state(),
        }

    def resume(self, fallback: bool = False, path: Path | None = None, step: int = 0) -> int | None:
        """Load the latest checkpoint (or `path`, or that of `step`) and return its step; None
        when there is none. Checkpoints after the one loaded are renamed `.rolled_back`.

        An unusable checkpoint is a CheckpointError (a UserError); with `fallback`, a damaged one
        is renamed `<name>.corrupt` (kept, out of the way of retention and later resumes) and the
        previous one is tried. One that does not fit this run's config is not set aside.
        """
        if self.info.is_main:
            ckpt.recover_interrupted(self.ckpt_root)
        ckpt.barrier()
        found = ckpt.list_checkpoints(self.ckpt_root)[::-1]
        candidates = [(ckpt.step_of(path), path)] if path is not None else found
        if step:
            candidates = [(s, p) for s, p in candidates if s <= step]
            if not candidates or candidates[0][0] != step:
                raise UserError(
                    f"train.resume_step={step}: {self.ckpt_root} has no checkpoint of that step "
                    f"(saved: {', '.join(str(s) for s, _ in found[::-1]) or 'none'})"
                )
        for i, (at, where) in enumerate(candidates):
            try:
                self._load(where)
            except ckpt.CheckpointError as e:
                if e.kind not in FALLBACK_KINDS:
                    raise
                if not fallback:
                    raise ckpt.CheckpointError(f"{e}: {ckpt.FALLBACK_HINT}", e.kind) from e
                if i == len(candidates) - 1:
                    raise UserError(
                        f"{e}; no earlier checkpoint is usable: start a new hydra.run.dir"
                    ) from e
                ckpt.set_aside(where, str(e), self.info.is_main)
                continue
            ckpt.roll_back_after(self.ckpt_root, at, self.info.is_main)
            return at
        return None

    def _load(self, path: Path) -> None:
        state = self._state(loading=path)
        ckpt.load_checkpoint(path, state)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except DataError as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: {e}", "mismatch") from e
        if not self._params_finite():
            raise ckpt.CheckpointError(
                f"checkpoint {path} holds non-finite parameters (training had diverged when it "
                f"was saved): resume from an earlier one with train.resume_step=<step>",
                "diverged",
            )
        torch.set_rng_state(state["rng"])
        self.step = int(state["scheduler"]["step"])
        restore_scheduler(self.scheduler, state["scheduler"])
        self.metrics.truncate_after(self.step)

    def save(self) -> Path:
        if not self._params_finite():  # a diverged state must not become the latest checkpoint
            raise UserError(
                f"parameters are not finite at step {self.step}: training stopped and no "
                f"checkpoint was written from this state; {self._recovery_hint()}"
            )
        return ckpt.save_checkpoint(
            self.ckpt_root, self.step, self._state(), self.info.is_main, self.cfg.keep_last
        )

    def _params_finite(self) -> bool:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        return ckpt.all_finite(params, self.info.device)

    def _recovery_hint(self) -> str:
        return ckpt.recovery_hint(self.ckpt_root)

    # -- steps -------------------------------------------------------------------------------
    def _autocast(self):  # noqa: ANN202
        """bf16 autocast where the strategy does not cast itself (ddp, none; fsdp, ep and
        fssdp run FSDP2's and the experts' mixed precision: fssdp/precision.py)."""
        if self.cfg.dtype == "bfloat16" and not self.par.mixed_precision:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, Any]:
        timed = self.cfg.phase_timing and self.will_log(self.step + 1)
        ph = self.phases
        self.profiler.before_step(self.step + 1)
        if timed:
            ph.start_step()
        elif ph.active:  # a step that raised left it running
            ph.end_step()
        t0 = time.perf_counter()
        with ph.phase("data"):
            inputs_BS, targets_BS = (t.to(self.info.device) for t in self.sampler.next())
        self.par.module.train()
        chunks = split_micro_batches(inputs_BS, targets_BS, self.cfg.micro_batch_size)
        fb = self.runner.run(chunks, self.step + 1, self._recovery_hint())
        self.par.finish_backward()
        if self.on_grads is not None:
            self.on_grads(self.par, self.step + 1)
        if timed and self.info.world_size > 1:
            with ph.phase("wait"):
                self._wait_for_ranks()
        with ph.phase("optimizer"):
            gnorm = self.par.clip_grad_norm_(self.optim_cfg.grad_clip or float("inf"))
            if not math.isfinite(float(gnorm)):  # stop before the update poisons the weights
                raise UserError(
                    f"gradient norm is {float(gnorm)} at step {self.step + 1}: training stopped "
                    "before the update and no checkpoint was written from this state; "
                    f"{self._recovery_hint()}"
                )
            self.opt.step()  # the strategy's end of step runs as its post-hook
            self.opt.zero_grad(set_to_none=True)
            lr = self.opt.param_groups[0]["lr"]  # this step's
            self.scheduler.step()
        self.step += 1
        step_time = time.perf_counter() - t0
        phases = ph.end_step()
        self.profiler.after_step(self.step)
        if self.trace is not None:
            self.trace.record(self.step, fb.load)
        return {
            "phases": phases,
            "loss": fb.ce,
            "aux_loss": 0.0 if fb.aux is None else fb.aux,
            "grad_norm": float(gnorm),
            "lr": lr,
            "step_time": step_time,
            "load": fb.load,
            "tokens": self.cfg.global_batch_size * self.cfg.seq_len,
            "micro_batches": fb.micro_batches,
            "prepass_s": fb.prepass_s,
        }

    def _wait_for_ranks(self) -> None:
        """A barrier (timed as phase `wait`: how long this rank waits for the slowest)."""
        if dist.is_initialized():
            dist.all_reduce(torch.zeros(1, device=self.info.device))

    @torch.no_grad()
    def validate(self) -> float:
        self.par.module.eval()
        total = 0.0
        for inputs_BS, targets_BS in self.val_data:
            ctx = MoEContext(reducer=self.reducer)
            with self._autocast():
                logits = self.par.module(inputs_BS.to(self.info.device), ctx)
                total += lm_loss(logits, targets_BS.to(self.info.device), self.reducer).item()
        return total / max(1, len(self.val_data))

    def _record(self, out: dict[str, Any]) -> dict[str, Any]:
        """Gather the step's per-rank figures into one metrics.jsonl record (every rank calls;
        one all-gather of a small vector per rank, plus the phase spans when timed)."""
        local = self.par.local_metrics()
        kinds = sorted(local.comm_bytes)
        mine = [out["step_time"], local.expert_time_s, local.state_bytes, peak_rss_bytes()]
        cuda = peak_cuda_bytes(self.info.device)
        extra = [out.get("prepass_s", 0.0), -1 if cuda is None else cuda]
        rows = all_gather_rows(
            mine + [local.comm_bytes[k] for k in kinds] + extra, self.info.device
        )
        rank_times, rank_expert = [r[0] for r in rows], [r[1] for r in rows]
        mean_expert = sum(rank_expert) / len(rank_expert)
        step_time = max(rank_times)
        record = {
            "step": self.step,
            "loss": out["loss"],
            "aux_loss": out["aux_loss"],
            "grad_norm": out["grad_norm"],
            "lr": out["lr"],
            "tokens_per_s": out["tokens"] / step_time,
            "step_time_s": step_time,
            "rank_step_time_s": rank_times,
            "rank_expert_time_s": rank_expert,
            "straggler_ratio": (max(rank_expert) / mean_expert) if mean_expert > 0 else None,
            "expert_load_imbalance": expert_load_imbalance(out["load"]),
            # bytes sent this step, summed over ranks, by collective
            "comm_bytes": {k: int(sum(r[4 + i] for r in rows)) for i, k in enumerate(kinds)},
            "replicas": local.replicas,  # replicas per expert per bank in this step
            "model_state_bytes": [r[2] for r in rows],
            "peak_rss_bytes": [int(r[3]) for r in rows],
            "expert_load": {b: [int(v) for v in c.tolist()] for b, c in out["load"].items()},
            "micro_batches": out.get("micro_batches", 1),
        }
        if out.get("micro_batches", 1) > 1 and self.cfg.batch_stats == "global":
            record["prepass_time_s"] = max(r[-2] for r in rows)  # launch/step.py pre-pass
        if cuda is not None:  # torch.cuda.max_memory_allocated per rank (GPU only)
            record["peak_cuda_bytes"] = [int(r[-1]) for r in rows]
        owners = getattr(self.par, "owner", None)  # ep, fssdp: owning rank per expert per bank
        now = None if owners is None else {b: [int(r) for r in o] for b, o in owners.items()}
        if now is not None and now != self._owners:  # logged when they change
            self._owners = record["owners"] = now
        if out.get("phases") is not None:  # the same on every rank: timing follows will_log
            record.update(gather_phases(out["phases"]))
        return record

    def fit(self) -> list[dict[str, Any]]:
        """Train to `train.steps`; a SIGTERM, SIGUSR1 or SIGINT stops it after the step in
        flight with a checkpoint ([Note: preemption] in launch/preempt.py)."""
        cfg = self.cfg
        preempt = Preemption(self.info.device)
        preempt.install()
        try:  # tensorboard's buffered events reach the disk even when a step fails
            while self.step < cfg.steps:
                out = self.train_step()
                last = self.step == cfg.steps
                record = self._record(out) if self.will_log(self.step) else None
                if (cfg.val_every and self.step % cfg.val_every == 0) or last:
                    val = self.validate()
                    record = record or self._record(out)
                    record["val_loss"] = val
                    if self.bits_per_byte:
                        record["val_bpb"] = val / math.log(2)
                if record is not None:
                    self.history.append(record)
                    self.metrics.log(record)
                saved = None
                due = (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last
                if due and cfg.checkpoints:
                    saved = self.save()
                if not last and (signum := preempt.agreed()):
                    stop_run(self, signum, saved)
        finally:
            preempt.uninstall()
            self.metrics.close()
        return self.history
