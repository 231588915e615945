"""The EP executor: a static placement and the token dispatcher, nothing else on its path.

Legend: N rows this rank routes into the bank, M rows it computes, E experts, W ranks,
K experts this rank owns (O is an output width elsewhere).

Each rank's bank parameters hold its owned experts' rows ([Note: expert parameters] in
fssdp/expert_params.py). A call all-gathers the [W, E] count matrix (fssdp/counts.py), sends
each row to its expert's owner by one all-to-all, computes with the owned parameters themselves
(autograd accumulates their gradients directly: no copies, no sparse collectives), and brings
the results back. `finish()` turns the summed gradients into the mean over ranks. Recomputed
by activation checkpointing, a call replays its counts ([Note: recomputation reuse] in
fssdp/recompute.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fssdp import precision
from fssdp.counts import CountExchange
from fssdp.dispatch import exchange_compute
from fssdp.precision import rows
from fssdp.recompute import recompute_counts, replaying
from fssdp.route import StaticRoute
from models.common.experts import ExpertBank


def local_index(expert_ids: tuple[int, ...], num_experts: int, device: torch.device) -> Tensor:
    """[E] position of each expert among `expert_ids` (-1 where this rank does not hold it)."""
    lut_E = torch.full((num_experts,), -1, dtype=torch.long, device=device)
    ids = torch.tensor(expert_ids, dtype=torch.long, device=device)
    lut_E[ids] = torch.arange(len(expert_ids), device=device)
    return lut_E


class EPExecutor:
    """`bank.executor` under `parallel=ep`."""

    def __init__(
        self,
        bank: ExpertBank,
        owner_E: Tensor,
        counts: CountExchange,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.bank = bank
        # bf16 casts of the owned rows ([Note: mixed precision of experts] fssdp/precision.py)
        self.compute_dtype = compute_dtype
        self.owner_E = owner_E
        self.count_exchange = counts  # the per-call count matrices ([Note: announced routing])
        self.ex = counts.ex
        # Global expert id -> row of the bank's (owned) parameters; fixed under EP.
        self.lut_E = local_index(bank.expert_ids or (), bank.num_experts, owner_E.device)
        # Whether any row went through the bank this step (anywhere): then every owned expert
        # gets a gradient, zeros where no row reached it, as the single-process bank does.
        self.used = False

    def __call__(self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        ex = self.ex
        counts_WE = recompute_counts(lambda: self.count_exchange.gather(expert_N))
        self.used |= torch.is_grad_enabled() and bool(counts_WE.sum() > 0)
        route = StaticRoute(counts_WE, self.owner_E)

        def compute(x_MD: Tensor, expert_M: Tensor) -> Tensor:
            local_M = self.lut_E.to(expert_M.device)[expert_M]
            cdt = self.compute_dtype
            return bank.compute(precision.weights(bank.stacked(), cdt), rows(x_MD, cdt), local_M)

        return exchange_compute(ex, x_ND, expert_N, route, compute, recompute=replaying())

    def finish(self, world: int) -> None:
        """After backward: the owners' summed gradients become the mean over ranks."""
        for p in self.bank.parameters(recurse=False):
            if p.grad is not None:
                p.grad.div_(world)
            elif self.used:
                p.grad = torch.zeros_like(p)
        self.used = False
