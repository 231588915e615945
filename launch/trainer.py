"""The training loop: one optimizer step per global batch, metrics, validation, checkpoints.

Legend: B this rank's sequences, S sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from fssdp.strategies.base import Parallelized
from launch import checkpoint as ckpt
from launch.data import GlobalBatchSampler
from launch.dist import DistInfo, all_gather_floats, batch_reducer
from launch.errors import UserError
from launch.metrics import MetricsLogger, expert_load_imbalance, peak_rss_bytes
from launch.optim import OptimConfig, set_lr
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
    resume: bool = False  # continue from the run directory's latest checkpoint
    progress: bool = True  # rank-0 progress line at every log step


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

    # -- state -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "app": ModelOptimState(self.par, self.opt),
            "sampler": self.sampler.state_dict(),
            "scheduler": {"step": self.step},
            "rng": torch.get_rng_state(),
        }

    def resume(self) -> int | None:
        found = ckpt.latest_checkpoint(self.ckpt_root)
        if found is None:
            return None
        step, path = found
        state = self._state()
        try:
            ckpt.load_checkpoint(path, state)
        except Exception as e:  # noqa: BLE001 - any read failure is the checkpoint's fault
            raise UserError(
                f"checkpoint {path} cannot be loaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}): move it aside to resume from an earlier one"
            ) from e
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["scheduler"]["step"])
        self.metrics.truncate_after(self.step)
        return step

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
        t0 = time.perf_counter()
        inputs_BS, targets_BS = (t.to(self.info.device) for t in self.sampler.next())
        ctx = MoEContext(reducer=self.reducer)
        self.par.module.train()
        with self._autocast():
            logits_BSV = self.par.module(inputs_BS, ctx)
            ce = lm_loss(logits_BSV, targets_BS, self.reducer)
            aux = ctx.aux_total()
            loss = ce if aux is None else ce + aux
        if not torch.isfinite(loss.detach()):
            raise UserError(
                f"loss is {loss.item()} at step {self.step + 1}: training stopped and no "
                "checkpoint was written from this state; lower optim.lr or use train.dtype=float32"
            )
        loss.backward()
        self.par.finish_backward()
        if self.on_grads is not None:
            self.on_grads(self.par, self.step + 1)
        gnorm = self.par.clip_grad_norm_(self.optim_cfg.grad_clip or float("inf"))
        set_lr(self.opt, self.step, self.cfg.steps, self.optim_cfg)
        self.par.optimizer_step(self.opt)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        step_time = time.perf_counter() - t0
        return {
            "loss": ce.item(),
            "aux_loss": 0.0 if aux is None else float(aux.item()),
            "grad_norm": float(gnorm),
            "lr": self.opt.param_groups[0]["lr"],
            "step_time": step_time,
            "load": ctx.expert_load,
            "tokens": self.cfg.global_batch_size * self.cfg.seq_len,
        }

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
        return {
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
            "replicas": self.par.placements(),  # replicas per expert per bank (next step's plan)
            "model_state_bytes": all_gather_floats(float(self.par.state_bytes(self.opt)), dev),
            "peak_rss_bytes": [int(v) for v in all_gather_floats(float(peak_rss_bytes()), dev)],
        }

    def fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        while self.step < cfg.steps:
            out = self.train_step()
            last = self.step == cfg.steps
            record = None
            if self.step % cfg.log_every == 0 or last or self.step == 1:
                record = self._record(out)
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
        self.metrics.close()
        return self.history
