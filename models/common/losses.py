"""Auxiliary routing losses from global-batch statistics (DESIGN.md §4).

Each function returns the *unweighted* global loss (the same value on every rank) with the
gradient convention of `models/common/context.py` [Note: gradient convention].

Legend: T tokens (this rank), E experts, B sequences (this rank), S sequence length, K top-k.
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
    """p̄ = global batch-mean of softmax(logits) [E]."""
    return global_mean(torch.softmax(logits_TE, -1).sum(0), logits_TE.shape[0], reducer)


def entropy_regularizer(logits_TE: Tensor, reducer: BatchReducer) -> Tensor:
    """MoEUT: −H(p̄) with p̄ the batch-mean softmax of the (pre-sigmoid) logits."""
    return -_entropy(mean_softmax(logits_TE, reducer))


def mutual_information_loss(
    logits_TE: Tensor, reducer: BatchReducer, reference_sign: bool = False
) -> Tensor:
    """SUT: −I(E;X) = H(E|X) − H(E). `reference_sign` gives the public code's H(E|X) + H(E)."""
    p_TE = torch.softmax(logits_TE, -1)
    h_cond = global_mean(_entropy(p_TE).sum(), p_TE.shape[0], reducer)
    h_marg = _entropy(mean_softmax(logits_TE, reducer))
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
