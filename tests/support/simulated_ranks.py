"""World-size invariance of a model's losses without spawning processes.

Each half of a batch plays one rank of two; the reducer's `all_sum` adds the other rank's
statistic, recorded by a first pass. The forward values never depend on `all_sum` results
(they are statistics of the batch), so a first pass records each rank's inputs in call order
and a second pass replays them as the other rank's share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import losses
from models.common.context import BatchReducer, MoEContext


def global_loss(model: nn.Module, tokens_BS: Tensor, reducer: BatchReducer) -> Tensor:
    return lm_loss(model, tokens_BS, MoEContext(reducer=reducer))


def lm_loss(model: nn.Module, tokens_BS: Tensor, ctx: MoEContext) -> Tensor:
    """CE global mean + weighted aux losses, as the trainer computes them."""
    reducer = ctx.reducer
    logits_BSV = model(tokens_BS[:, :-1], ctx)
    ce_sum = F.cross_entropy(logits_BSV.flatten(0, 1), tokens_BS[:, 1:].flatten(), reduction="sum")
    ce = losses.global_mean(ce_sum, tokens_BS[:, 1:].numel(), reducer)
    aux = ctx.aux_total()
    return ce if aux is None else ce + aux


def grads(model: nn.Module) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def two_rank_loss_and_grads(model: nn.Module, tokens_BS: Tensor) -> list[tuple[Tensor, list]]:
    """(loss, gradients) of each simulated rank, in rank order."""
    halves = tokens_BS.chunk(2)
    recorded: list[list[Tensor]] = []
    with torch.no_grad():
        for half in halves:
            rec: list[Tensor] = []
            global_loss(model, half, BatchReducer(2, lambda t, rec=rec: rec.append(t) or t))
            recorded.append(rec)
    out = []
    for r, half in enumerate(halves):
        other = iter(recorded[1 - r])
        model.zero_grad()
        loss = global_loss(model, half, BatchReducer(2, lambda t, o=other: t + next(o)))
        loss.backward()
        out.append((loss.detach(), grads(model)))
    return out
