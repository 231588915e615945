"""Auxiliary routing losses from global-batch statistics: world-size invariant at W = 1, 2, 4
(per-sequence and weighted means and the pooled Switch loss included)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from launch.dist import batch_reducer
from models.common import losses
from models.common.context import BatchReducer, MoEContext
from models.common.router import TopKRouter
from tests.support.harness import run_distributed


def _losses_and_grads(rank: int, world: int) -> tuple[float, torch.Tensor]:
    """Every aux loss on this rank's slice of a fixed global batch, with the router gradient."""
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 2, route_skew=0.5).double()
    x = torch.randn(24, 8, dtype=torch.float64)
    n = 24 // world
    ctx = MoEContext(reducer=batch_reducer() if world > 1 else BatchReducer())
    r = router(x[rank * n : (rank + 1) * n])
    r2 = router(0.5 * x[rank * n : (rank + 1) * n])  # a second "layer", for the pooled loss
    counts = losses.global_counts(r, 6, ctx.reducer)
    pool = losses.SwitchPool()
    pool.add(r, counts)
    pool.add(r2, losses.global_counts(r2, 6, ctx.reducer))
    mass_N = torch.sigmoid(r.logits_TE[:, 0])  # weights that carry gradient (SUT: halting mass)
    total = (
        losses.switch_loss(r, counts, ctx.reducer)
        + pool.loss(ctx.reducer)
        + losses.z_loss(r, ctx.reducer)
        + losses.entropy_regularizer(r.logits_TE, ctx.reducer)
        + losses.sequence_entropy_regularizer(r.logits_TE.view(n // 3, 3, 6), ctx.reducer)
        + losses.mutual_information_loss(r.logits_TE, ctx.reducer)
        + losses.mutual_information_loss(r.logits_TE, ctx.reducer, weights_N=mass_N)
        + losses.sequence_balance_loss(r, n // 3, ctx.reducer)  # sequences of 3
    )
    total.backward()
    grad = router.weight.grad.clone()
    if world > 1:  # strategies average gradients over ranks
        dist.all_reduce(grad)
        grad /= world
    return total.item(), grad


def test_aux_losses_are_world_size_invariant() -> None:
    ref_loss, ref_grad = run_distributed(_losses_and_grads, 1)[0]
    for world in (2, 4):
        for loss, grad in run_distributed(_losses_and_grads, world):
            assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


