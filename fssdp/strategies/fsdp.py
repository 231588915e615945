"""`parallel=fsdp`: FSDP2 over every parameter, experts included (gathered every step)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from fssdp.dense import shard_dense
from fssdp.strategies.base import Parallelized
from models.common.experts import ExpertBank


class FSDPParallel(Parallelized):
    name = "fsdp"

    def __init__(self, model: nn.Module) -> None:
        w = dist.get_world_size()
        bank_params = {
            id(p)
            for m in model.modules()
            if isinstance(m, ExpertBank)
            for p in m.parameters(recurse=False)
        }
        elt = lambda p: p.numel() * p.element_size()  # noqa: E731
        self._expert_bytes = sum(elt(p) for p in model.parameters() if id(p) in bank_params)
        self._dense_bytes = sum(elt(p) for p in model.parameters() if id(p) not in bank_params)
        self._w = w
        super().__init__(shard_dense(model))

    def comm_bytes(self) -> dict[str, int]:
        # Each all-gather or reduce-scatter of B bytes sends (W−1)·B in total over the ranks;
        # per step: all-gather in forward, again in backward (resharded after forward), and a
        # reduce-scatter of the gradients.
        per_op = self._w - 1
        total = 3 * per_op * (self._expert_bytes + self._dense_bytes)
        return {
            "spag": 0,
            "sprs": 0,
            "a2a": 0,
            "dense": total,
            "fsdp_expert_gather": 2 * per_op * self._expert_bytes,
        }
