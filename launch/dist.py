"""Process-group set-up: torchrun or plain `python` (world 1), gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from models.common.context import BatchReducer


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    ranks_per_node: int  # from LOCAL_WORLD_SIZE: feeds the planner's and dispatcher's topology
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float) -> DistInfo:
    """Join (or create, when launched without torchrun) the default process group."""
    if "RANK" not in os.environ:  # plain `python -m launch.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout, device_id=None)
        else:
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timeout
            )
    return DistInfo(rank, world, local_rank, per_node, device)


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun the workers share the agent's TCPStore, which outlives a restart
    (`--max-restarts`): process-group addresses that the failed attempt wrote would be read as
    current and the new group would connect to dead ranks. One key prefix per attempt."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"fssdp/attempt_{restart}", store)


def batch_reducer(group: dist.ProcessGroup | None = None) -> BatchReducer:
    """The reducer models use for global-batch statistics (sum over data-parallel ranks)."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return BatchReducer()

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return BatchReducer(world_size=world, all_sum=all_sum)


def all_gather_floats(value: float, device: torch.device) -> list[float]:
    """One float from each rank, in rank order (small, for metrics)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if world == 1:
        return [value]
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [o.item() for o in out]
