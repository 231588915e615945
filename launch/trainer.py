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
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from fssdp.phases import PhaseTimer, time_routers
from fssdp.strategies.base import Parallelized
from launch import checkpoint as ckpt
from launch.data import DataError, GlobalBatchSampler
from launch.dist import DistInfo, all_gather_floats, batch_reducer
from launch.errors import UserError
from launch.metrics import MetricsLogger, expert_load_imbalance, peak_rss_bytes
from launch.optim import OptimConfig, set_lr
from launch.profile import StepProfiler, TraceRecorder, gather_phases
from models.common.context import BatchReducer, MoEContext, global_sum

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, split evenly over ranks
    seq_len: int = 128
    dtype: str = "float32"  # float32 | float64 | bfloat16 (bf16 autocast, fp32 master weights)
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end
    ckpt_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 3  # checkpoints kept (0 = all)
    # auto: continue from the run directory's latest checkpoint when one exists (what a
    # torchrun restart needs); true: require the checkpoints folder; false: start fresh
    resume: str = "auto"
    resume_fallback: bool = False  # an unusable latest checkpoint: set it aside, load the previous
    progress: bool = True  # rank-0 progress line at every log step
    phase_timing: bool = True  # per-rank phase times and spans of every logged step
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: torch.profiler, steps a..b
    routing_trace: bool = False  # rank 0 writes <run>/routing_trace.jsonl (tokens per expert)

    def __post_init__(self) -> None:
        p = list(self.profile_steps)
        if p and not (len(p) == 2 and 1 <= p[0] <= p[1] <= self.steps):
            raise UserError(
                f"train.profile_steps={p}: give two steps [a,b] with 1 ≤ a ≤ b ≤ train.steps="
                f"{self.steps} (e.g. train.profile_steps=[3,5])"
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
        return self.par.state_dict(self.opt)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.par.load_state_dict(sd, self.opt)


def lm_loss(logits_BSV: Tensor, targets_BS: Tensor, reducer: BatchReducer) -> Tensor:
    """Global mean cross-entropy over every token of the global batch (see context.py note)."""
    ce_sum = F.cross_entropy(
        logits_BSV.flatten(0, 1).to(_loss_dtype(logits_BSV)), targets_BS.flatten(), reduction="sum"
    )
    n_local = torch.tensor(float(targets_BS.numel()), dtype=torch.float64, device=ce_sum.device)
    n_global = reducer.all_sum(n_local)
    return global_sum(ce_sum, reducer) / n_global.to(ce_sum.dtype)


def _loss_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
        self.metrics = MetricsLogger(run_dir, info.is_main, train_cfg.steps, train_cfg.progress)
        self.history: list[dict[str, Any]] = []  # rank 0's logged records (for the summary)
        self._init_profiling()

    def _init_profiling(self) -> None:
        """Phase timer (fssdp/phases.py), torch.profiler window, routing trace (launch/profile)."""
        cfg, info = self.cfg, self.info
        self.phases = PhaseTimer(info.device)
        if cfg.phase_timing:
            self.par.set_phase_timer(self.phases)
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
    def _state(self) -> dict[str, Any]:
        return {
            "app": ModelOptimState(self.par, self.opt),
            "sampler": self.sampler.state_dict(),
            "scheduler": {"step": self.step},
            "rng": torch.get_rng_state(),
        }

    def resume(self, fallback: bool = False, path: Path | None = None) -> int | None:
        """Load the latest checkpoint (or `path`) and return its step; None when there is none.

        An unusable checkpoint is a UserError; with `fallback` it is renamed `<name>.corrupt`
        (kept, out of the way of retention and later resumes) and the previous one is tried.
        """
        if self.info.is_main:
            ckpt.recover_interrupted(self.ckpt_root)
        ckpt.barrier()
        found = ckpt.list_checkpoints(self.ckpt_root)[::-1]
        candidates = [(ckpt.step_of(path), path)] if path is not None else found
        for i, (step, where) in enumerate(candidates):
            try:
                self._load(where)
                return step
            except ckpt.CheckpointError as e:
                if not fallback:
                    raise UserError(f"{e}: {ckpt.FALLBACK_HINT}") from e
                if i == len(candidates) - 1:
                    raise UserError(
                        f"{e}; no earlier checkpoint is usable: start a new hydra.run.dir"
                    ) from e
                ckpt.set_aside(where, str(e), self.info.is_main)
        return None

    def _load(self, path: Path) -> None:
        state = self._state()
        ckpt.load_checkpoint(path, state)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except DataError as e:
            raise UserError(f"{e} (checkpoint {path})") from e
        torch.set_rng_state(state["rng"])
        self.step = int(state["scheduler"]["step"])
        self.metrics.truncate_after(self.step)

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.ckpt_root, self.step, self._state(), self.info.is_main, self.cfg.keep_last
        )

    # -- steps -------------------------------------------------------------------------------
    def _autocast(self):  # noqa: ANN202
        if self.cfg.dtype == "bfloat16":
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
        ctx = MoEContext(reducer=self.reducer)
        self.par.module.train()
        with ph.phase("forward"), self._autocast():
            logits_BSV = self.par.module(inputs_BS, ctx)
            ce = lm_loss(logits_BSV, targets_BS, self.reducer)
            aux = ctx.aux_total()
            loss = ce if aux is None else ce + aux
        if not torch.isfinite(loss.detach()):
            raise UserError(
                f"loss is {loss.item()} at step {self.step + 1}: training stopped and no "
                "checkpoint was written from this state; lower optim.lr or use train.dtype=float32"
            )
        with ph.phase("backward"):
            loss.backward()
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
                    "before the update and no checkpoint was written from this state; lower "
                    "optim.lr or use train.dtype=float32"
                )
            set_lr(self.opt, self.step, self.cfg.steps, self.optim_cfg)
            self.par.optimizer_step(self.opt)
            self.opt.zero_grad(set_to_none=True)
        self.step += 1
        step_time = time.perf_counter() - t0
        phases = ph.end_step()
        self.profiler.after_step(self.step)
        if self.trace is not None:
            self.trace.record(self.step, ctx.expert_load)
        return {
            "phases": phases,
            "loss": ce.item(),
            "aux_loss": 0.0 if aux is None else float(aux.item()),
            "grad_norm": float(gnorm),
            "lr": self.opt.param_groups[0]["lr"],
            "step_time": step_time,
            "load": ctx.expert_load,
            "tokens": self.cfg.global_batch_size * self.cfg.seq_len,
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
        """Gather the step's per-rank figures into one metrics.jsonl record (every rank calls)."""
        dev = self.info.device
        rank_times = all_gather_floats(out["step_time"], dev)
        expert_t = self.par.expert_time_s()
        rank_expert = all_gather_floats(expert_t, dev) if expert_t is not None else None
        mean_expert = sum(rank_expert) / len(rank_expert) if rank_expert else 0.0
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
            "comm_bytes": self.par.comm_bytes(),
            "replicas": self.par.placements(),  # replicas per expert per bank in this step
            "model_state_bytes": all_gather_floats(float(self.par.state_bytes(self.opt)), dev),
            "peak_rss_bytes": [int(v) for v in all_gather_floats(float(peak_rss_bytes()), dev)],
            "expert_load": {b: [int(v) for v in c.tolist()] for b, c in out["load"].items()},
        }
        if out.get("phases") is not None:  # the same on every rank: timing follows will_log
            record.update(gather_phases(out["phases"]))
        return record

    def fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
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
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                    self.save()
        finally:
            self.metrics.close()
        return self.history
