"""`parallel=ddp`: every rank holds every parameter; gradients all-reduced (averaged)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fssdp.strategies.base import Parallelized


class DDPParallel(Parallelized):
    name = "ddp"

    def __init__(self, model: nn.Module) -> None:
        # Experts that receive no tokens on a rank get no gradient there: DDP must look for
        # unused parameters every step rather than hang waiting for them.
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        super().__init__(model, ddp)
        self._grad_bytes = sum(
            p.numel() * p.element_size() for _, p in self.named_optimizer_params()
        )

    def comm_bytes(self) -> dict[str, int]:
        w = dist.get_world_size()
        # Ring all-reduce: each rank sends 2(W−1)/W of the gradient bytes.
        return {"spag": 0, "sprs": 0, "a2a": 0, "dense": 2 * (w - 1) * self._grad_bytes}
