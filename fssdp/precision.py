"""bf16 mixed precision as FSDP2 users know it (`train.dtype=bfloat16` under fsdp, ep, fssdp).

Dense parameters: FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: fp32
master weights and optimizer state in the shards, bf16 all-gathers and compute, gradients
reduce-scattered in fp32. `ddp` and `none` keep bf16 autocast (the trainer's).

[Note: mixed precision of experts]
The experts follow the same rule. Owners keep their rows as fp32 parameters (master weights)
and the optimizer state in fp32; they compute with bf16 casts of them (`weights`), whose
backward casts the gradient up, so autograd accumulates fp32 gradients in the owned rows'
`.grad`. The spAG sends bf16 copies of the owned rows (half the bytes of fp32: `comm_bytes`
`spag`), so replicas are bf16 leaves and their gradients bf16; before the spRS they are cast
up to fp32 (`fssdp/replicas.py`), so the sum over holders, the owner's own gradient and the
division by W are fp32. Token rows travel in the activations' dtype (bf16 under the policy).

The dtype is set for the strategies built inside `mixed_precision(dtype)` (launch/build.py):
`fssdp.parallelize` builds the strategy, whose constructor shards the dense part at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.distributed.fsdp import MixedPrecisionPolicy

_COMPUTE: list[torch.dtype | None] = [None]


@contextmanager
def mixed_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Strategies built inside compute in `dtype` (None: in the parameters' dtype)."""
    prev = _COMPUTE[0]
    _COMPUTE[0] = dtype
    try:
        yield
    finally:
        _COMPUTE[0] = prev


def compute_dtype() -> torch.dtype | None:
    """The compute dtype of strategies built now (None: full precision)."""
    return _COMPUTE[0]


def fsdp_policy(dtype: torch.dtype | None) -> MixedPrecisionPolicy | None:
    """FSDP2's policy for compute dtype `dtype`: bf16 parameters, fp32 reduce."""
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def weights(w: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """An owner's stacked weights in the compute dtype (differentiable casts)."""
    if dtype is None:
        return w
    return {k: v if v.dtype == dtype else v.to(dtype) for k, v in w.items()}


def rows(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Token rows in the compute dtype."""
    return x if dtype is None or x.dtype == dtype else x.to(dtype)
