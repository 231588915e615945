"""Auxiliary routing losses from global-batch statistics.

Each function returns the *unweighted* global loss (the same value on every rank) with the
gradient convention of `models/common/context.py` [Note: gradient convention].

Legend: T tokens (this rank), E experts, B sequences (this rank), S sequence length, K top-k,
X rows of one sequence (its positions of every call), N rows of several calls pooled.

[Note: per-sequence statistics]
Some losses are means over sequences of a per-sequence statistic (MoEUT's entropy regulariser:
−H of the selection softmax averaged over one sequence's positions and repeats; DeepSeek's
sequence-level balance loss). They stay global-batch statistics under sharding because every
rank holds whole sequences (the global batch is split along the batch dim): each
per-sequence term is computed from local rows only, each rank sums its terms, and
`global_mean(local_sum, local_sequences)` divides the global sum by the global number of
sequences. The value is then the same for any world size, and `global_sum`'s gradient follows
[Note: gradient convention]. Weighted means (SUT's MI loss, rows weighted by their remaining
halting mass) divide one `global_sum` by another, the weights' sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.common.context import BatchReducer, global_sum
from models.common.router import Routing


def global_mean(local_sum: Tensor, local_count: int, reducer: BatchReducer) -> Tensor:
    """Global mean of a per-row quantity whose local sum is `local_sum`."""
    count = reducer.all_sum(
        torch.tensor(float(local_count), dtype=torch.float64, device=local_sum.device)
    )
    return global_sum(local_sum, reducer) / count.to(local_sum.dtype)


def global_counts(routing: Routing, num_experts: int, reducer: BatchReducer) -> Tensor:
    """Global tokens per expert [E] (int64, no gradient)."""
    return reducer.all_sum(routing.counts(num_experts))


class SwitchPool:
    """Switch statistics of several calls pooled into one loss, as transformers'
    `load_balancing_loss_func` (Mixtral, Jamba): E·Σ_e F_e·P_e with F_e the share of all
    (row, k) choices of e and P_e the mean score of e over the rows of *every* call together
    (≈ K at uniform routing), where the per-layer form sums one such loss per call."""

    def __init__(self) -> None:
        self.counts_E: Tensor | None = None  # global, summed over calls
        self.score_sum_E: Tensor | None = None  # local, summed over calls
        self.rows = 0  # local rows, summed over calls

    def add(self, routing: Routing, counts_E: Tensor) -> None:
        if self.counts_E is not None and self.counts_E.shape != counts_E.shape:
            raise ValueError("a pooled Switch loss needs the same number of experts in every call")
        scores_E = routing.scores_TE.sum(0)
        self.counts_E = counts_E if self.counts_E is None else self.counts_E + counts_E
        self.score_sum_E = scores_E if self.score_sum_E is None else self.score_sum_E + scores_E
        self.rows += routing.scores_TE.shape[0]

    def loss(self, reducer: BatchReducer) -> Tensor:
        assert self.counts_E is not None and self.score_sum_E is not None, "no call was added"
        dt = self.score_sum_E.dtype
        n = reducer.all_sum(
            torch.tensor(float(self.rows), dtype=torch.float64, device=self.score_sum_E.device)
        ).to(dt)
        f_E = self.counts_E.to(dt) / n
        P_E = global_sum(self.score_sum_E, reducer) / n
        return self.counts_E.shape[0] * (f_E * P_E).sum()


def switch_loss(routing: Routing, counts_E: Tensor, reducer: BatchReducer) -> Tensor:
    """Switch/GShard load balancing E·Σ_e f_e·P_e; f_e sums to K, so ≈ K at uniform routing."""
    T, E = routing.scores_TE.shape
    n_tokens = reducer.all_sum(
        torch.tensor(float(T), dtype=torch.float64, device=routing.scores_TE.device)
    )
    f_E = counts_E.to(routing.scores_TE.dtype) / n_tokens.to(routing.scores_TE.dtype)
    P_E = global_mean(routing.scores_TE.sum(0), T, reducer)
    return E * (f_E * P_E).sum()


def z_loss(routing: Routing, reducer: BatchReducer) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)²."""
    lse_T = torch.logsumexp(routing.logits_TE, dim=-1)
    return global_mean((lse_T**2).sum(), lse_T.shape[0], reducer)


def _entropy(p_E: Tensor) -> Tensor:
    return -(p_E * torch.log(p_E.clamp_min(1e-30))).sum(-1)


def mean_softmax(logits_TE: Tensor, reducer: BatchReducer) -> Tensor:
    """p̄ = global batch-mean of softmax(logits) [E] (any extra dims between T and E kept)."""
    return global_mean(torch.softmax(logits_TE, -1).sum(0), logits_TE.shape[0], reducer)


def entropy_regularizer(logits_TE: Tensor, reducer: BatchReducer) -> Tensor:
    """−H(p̄) with p̄ the mean softmax over every row of the global batch (one pool)."""
    return -_entropy(mean_softmax(logits_TE, reducer))


def sequence_entropy_regularizer(logits_BXE: Tensor, reducer: BatchReducer) -> Tensor:
    """MoEUT (reference code): per sequence p̄_b = mean of softmax over its X rows (positions of
    every call), then the global mean over sequences of −H(p̄_b), averaged over any extra dims
    (heads) [Note: per-sequence statistics]."""
    B = logits_BXE.shape[0]
    neg_h_B = -_entropy(torch.softmax(logits_BXE, -1).mean(1)).reshape(B, -1).mean(1)
    return global_mean(neg_h_B.sum(), B, reducer)


def mutual_information_loss(
    logits_NE: Tensor,
    reducer: BatchReducer,
    reference_sign: bool = False,
    weights_N: Tensor | None = None,
) -> Tensor:
    """SUT: −I(E;X) = H(E|X) − H(E). `reference_sign` gives the public code's H(E|X) + H(E).

    Rows count equally, or with `weights_N` (SUT's reference: each row's remaining halting
    mass) in both H(E|X) and the marginal; the weights carry gradient.
    """
    p_NE = torch.softmax(logits_NE, -1)
    if weights_N is None:
        h_cond = global_mean(_entropy(p_NE).sum(), p_NE.shape[0], reducer)
        h_marg = _entropy(mean_softmax(logits_NE, reducer))
    else:
        w_N = weights_N.to(p_NE.dtype)
        total = global_sum(w_N.sum(), reducer)
        h_cond = global_sum((w_N * _entropy(p_NE)).sum(), reducer) / total
        h_marg = _entropy(global_sum((w_N[:, None] * p_NE).sum(0), reducer) / total)
    return h_cond + h_marg if reference_sign else h_cond - h_marg


def sequence_balance_loss(routing: Routing, batch: int, reducer: BatchReducer) -> Tensor:
    """DeepSeek sequence-level balance: mean over sequences of Σ_e f_e·P_e,
    f_e = E/(K·S)·(tokens of the sequence routed to e), P_e = mean score of e over the sequence."""
    T, E = routing.scores_TE.shape
    K = routing.expert_TK.shape[1]
    S = T // batch
    onehot_BSE = torch.zeros(
        batch, S, E, dtype=routing.scores_TE.dtype, device=routing.scores_TE.device
    )
    onehot_BSE.view(T, E).scatter_add_(
        1, routing.expert_TK, torch.ones_like(routing.expert_TK, dtype=onehot_BSE.dtype)
    )
    f_BE = onehot_BSE.sum(1) * (E / (K * S))
    P_BE = routing.scores_TE.view(batch, S, E).mean(1)
    return global_mean((f_BE * P_BE).sum(), batch, reducer)
