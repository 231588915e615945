"""Causality checks that hold on any CPU: earlier outputs unchanged to round-off, not bit-equal.

Changing a later token changes routing, so the earlier rows go through matmuls of other shapes,
and BLAS kernels (MKL/AVX paths differ across Intel and AMD) may round them differently. A real
leak of information from the future is many orders above that round-off; `leak_future` makes
one (1e-6 of the sequence mean added to every position right after the embedding) so each test
can show that its check would catch it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# float64 round-off through a small model is ~1e-16 relative; a leak of 1e-6 shows as ≥ 1e-8.
CAUSAL_RTOL = 1e-12


def rel_change(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def causal_errors(
    model: Callable[[Tensor], Tensor], tokens_BS: Tensor, t: int, vocab: int = 256
) -> tuple[float, float]:
    """(relative change of the outputs before position t, largest change at or after it) when
    the token at t changes."""
    changed = tokens_BS.clone()
    changed[:, t] = (changed[:, t] + 1) % vocab
    with torch.no_grad():
        base, out = model(tokens_BS), model(changed)
    past = rel_change(out[:, :t], base[:, :t])
    future = (out[:, t:] - base[:, t:]).abs().max().item()
    return past, future


def assert_causal(model: nn.Module, tokens_BS: Tensor, t: int) -> None:
    """Outputs before t unchanged to round-off, those from t on changed; and a leak of 1e-6
    through the same model fails that check."""
    past, future = causal_errors(model, tokens_BS, t)
    assert past <= CAUSAL_RTOL, f"outputs before position {t} changed by {past:.2e} relative"
    assert future > 1e-6, f"the change at position {t} did not propagate ({future:.2e})"
    with leak_future(model):
        leaked, _ = causal_errors(model, tokens_BS, t)
    assert leaked > CAUSAL_RTOL, f"the check missed a 1e-6 leak ({leaked:.2e} relative)"


@contextmanager
def leak_future(model: nn.Module, eps: float = 1e-6) -> Iterator[None]:
    """Make the model non-causal by eps: every position's embedding gets eps × the sequence mean."""
    emb = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    handle = emb.register_forward_hook(
        lambda mod, args, out: out + eps * out.mean(dim=1, keepdim=True)
    )
    try:
        yield
    finally:
        handle.remove()
