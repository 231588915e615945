"""The forward and backward of one optimizer step: micro-batches (gradient accumulation), the
statistics pre-pass, and the per-micro-batch synchronisation rule of the strategies.

Legend: B this rank's sequences, b sequences of one micro-batch, S sequence length, M
micro-batches per step, W ranks.

With `train.micro_batch_size` = b < B the step runs M = B / b forwards and backwards, and the
strategy synchronises gradients once, after the last ([Note: sync per step] in
fssdp/strategies/base.py). `train.batch_stats` picks the statistics of the losses:
- `global` (default): every micro-batch's losses are those of the full global batch, exactly
  ([Note: accumulation statistics] in models/common/context.py): a no-grad pre-pass over the
  step's micro-batches records every `all_sum` input, one all-reduce per dtype gives the
  full-step totals, and the micro-batch forwards replay them. Costs one no-grad forward per
  step. Each micro-batch's backward runs unscaled (its share is already in the statistics).
- `micro_batch`: each micro-batch's losses use its own statistics over ranks (Megatron-LM's
  default); the step's loss is their mean (backward of loss / M). No pre-pass; the cross
  entropy is the same as the full batch's (equal token counts), the auxiliary losses are not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fssdp.phases import PhaseTimer
from fssdp.strategies.base import Parallelized
from launch.errors import UserError
from models.common.context import BatchReducer, MoEContext, StepStatistics, global_sum

# (logits_BSV, targets_BS, reducer) -> the global mean cross entropy
LossFn = Callable[[Tensor, Tensor, BatchReducer], Tensor]


@dataclass
class StepOutput:
    ce: float
    aux: float | None
    load: dict[str, Tensor] = field(default_factory=dict)  # global tokens per expert per bank
    micro_batches: int = 1
    prepass_s: float = 0.0  # the statistics pre-pass (batch_stats=global, M > 1)


def split_micro_batches(
    inputs_BS: Tensor, targets_BS: Tensor, size: int
) -> list[tuple[Tensor, Tensor]]:
    """This rank's batch as micro-batches of `size` sequences (0: one, the whole batch)."""
    B = inputs_BS.shape[0]
    if size <= 0 or size >= B:
        return [(inputs_BS, targets_BS)]
    if B % size:
        raise UserError(
            f"train.micro_batch_size={size} does not divide the {B} sequences per rank: use a "
            "divisor of train.global_batch_size / world size"
        )
    return list(zip(inputs_BS.split(size), targets_BS.split(size)))


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


class StepRunner:
    """Runs the forward and backward of one step, micro-batch by micro-batch."""

    def __init__(
        self,
        par: Parallelized,
        reducer: BatchReducer,
        loss_fn: LossFn,
        autocast: Callable[[], AbstractContextManager[object]],
        phases: PhaseTimer,
        batch_stats: str,
    ) -> None:
        self.par, self.reducer, self.loss_fn = par, reducer, loss_fn
        self.autocast, self.phases, self.batch_stats = autocast, phases, batch_stats

    def run(self, chunks: list[tuple[Tensor, Tensor]], step: int, hint: str) -> StepOutput:
        """Forward and backward of every micro-batch; gradients are synchronised (by the
        strategy) in the last one's backward. `hint`: how to recover from a non-finite loss."""
        M = len(chunks)
        exact = M > 1 and self.batch_stats == "global"
        prepass_s = 0.0
        stats = None
        if exact:
            t0 = time.perf_counter()
            stats = self._prepass(chunks)
            prepass_s = time.perf_counter() - t0
        ces: list[Tensor] = []
        auxes: list[Tensor] = []
        load: dict[str, Tensor] = {}
        for m, (x_bS, y_bS) in enumerate(chunks):
            reducer = stats.replayer() if stats is not None else self.reducer
            scale = 1.0 if (exact or M == 1) else 1.0 / M
            with self.par.micro_batch(last=m == M - 1):
                ce, aux, ctx = self._forward_backward(x_bS, y_bS, reducer, scale, step, hint)
            ces.append(ce)
            if aux is not None:
                auxes.append(aux)
            if exact:
                load = ctx.expert_load  # full-step totals in every micro-batch
            else:
                for k, v in ctx.expert_load.items():
                    load[k] = v if k not in load else load[k] + v
        if exact:  # every micro-batch has the full batch's values
            ce_v, aux_v = ces[-1].item(), (auxes[-1].item() if auxes else None)
        else:
            ce_v = float(torch.stack([c.double() for c in ces]).mean())
            aux_v = float(torch.stack([a.double() for a in auxes]).mean()) if auxes else None
        return StepOutput(ce_v, aux_v, load, M, prepass_s)

    def _forward_backward(
        self, x_bS: Tensor, y_bS: Tensor, reducer: BatchReducer, scale: float, step: int,
        hint: str,
    ) -> tuple[Tensor, Tensor | None, MoEContext]:
        ctx = MoEContext(reducer=reducer)
        ph = self.phases
        with ph.phase("forward"), self.autocast():
            logits_bSV = self.par.module(x_bS, ctx)
            ce = self.loss_fn(logits_bSV, y_bS, ctx.reducer)
            aux = ctx.aux_total()
            loss = ce if aux is None else ce + aux
        if not torch.isfinite(loss.detach()):
            raise UserError(
                f"loss is {loss.item()} at step {step}: training stopped and no checkpoint "
                f"was written from this state; {hint}"
            )
        with ph.phase("backward"):
            (loss if scale == 1.0 else loss * scale).backward()
        return ce.detach(), (None if aux is None else aux.detach()), ctx

    @torch.no_grad()
    def _prepass(self, chunks: list[tuple[Tensor, Tensor]]) -> StepStatistics:
        """Record every micro-batch's `all_sum` inputs and reduce them to full-step totals
        ([Note: accumulation statistics]). The RNG is restored afterwards, so the training
        forwards draw what the pre-pass drew (dropout)."""
        stats = StepStatistics(self.reducer)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with (
            torch.random.fork_rng(devices=devices),
            self.par.statistics_pass(),
            self.phases.phase("forward"),
            self.autocast(),
        ):
            for x_bS, y_bS in chunks:
                ctx = MoEContext(reducer=stats.recorder())
                logits_bSV = self.par.module(x_bS, ctx)
                self.loss_fn(logits_bSV, y_bS, ctx.reducer)
                ctx.aux_total()
        stats.reduce()
        return stats
