"""`launch.train` with perfectly balanced routing: the no-imbalance reference for EP.

    torchrun --nproc_per_node W -m perf.balanced_train <launch.train overrides>

[Note: balanced routing without touching the models]
Every router in the zoo ends in `models.common.router.route` (top-k of the scores). Here that
function is wrapped so that token x of a call picks experts (x·K + j) mod E, j < K, round robin,
with gates read from the router's own scores (so the router still gets gradients). When a rank's
rows·K is a multiple of E, every expert receives exactly rows·K/E rows from every rank: no expert,
rank or link is hotter than another. The models stay untouched and parallelism-free; the trainer
is the real one (`launch.train.main`).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from models.common import router


def round_robin_experts(rows: int, top_k: int, num_experts: int) -> Tensor:
    """[rows, K] expert ids (x·K + j) mod E: each expert gets rows·K/E rows when E | rows·K."""
    x_X1 = torch.arange(rows, dtype=torch.long)[:, None]
    return (x_X1 * top_k + torch.arange(top_k)[None, :]) % num_experts


def balanced_route(
    logits_XE: Tensor, top_k: int, score: str = "softmax", renormalize: bool = False
) -> router.Routing:
    """`router.route` with round-robin expert choice by token (the first dim); middle dims
    (e.g. attention heads [T, H, A]) each get the same balanced choice."""
    chosen = _original_route(logits_XE, top_k, score, renormalize)
    lead, E = logits_XE.shape[:-1], logits_XE.shape[-1]
    by_token_TK = round_robin_experts(lead[0], top_k, E).to(logits_XE.device)
    expert = by_token_TK.view(lead[0], *([1] * (len(lead) - 1)), top_k).expand(*lead, top_k)
    gate = chosen.scores_TE.gather(-1, expert)
    if renormalize:
        gate = gate / gate.sum(-1, keepdim=True)
    return router.Routing(expert.contiguous(), gate, chosen.logits_TE, chosen.scores_TE)


_original_route = router.route


def install() -> list[str]:
    """Swap `route` for `balanced_route` in every loaded models.* module; their names."""
    import models.registry as registry

    registry.model_specs()  # import every family so their `route` bindings exist
    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("models") and getattr(mod, "route", None) is _original_route:
            mod.route = balanced_route  # type: ignore[attr-defined]
            patched.append(name)
    return patched


def main(argv: list[str] | None = None) -> None:
    from launch.train import main as train_main

    install()
    train_main(argv)


if __name__ == "__main__":
    from launch.leave import run_main

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_main(lambda: main(sys.argv[1:]))
