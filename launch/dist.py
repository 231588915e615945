"""Process-group set-up: torchrun or plain `python` (world 1), gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from launch.errors import UserError, os_error_line
from models.common.context import BatchReducer

T = TypeVar("T")
# The agent's TCPStore under torchrun (it outlives a worker restart), else None; and the store
# this attempt's ranks share (failure reports). Set by init_distributed.
_AGENT_STORE: Any = None
_ATTEMPT_STORE: Any = None
_FAILURE_KEY = "fssdp_failure"


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
        global _ATTEMPT_STORE
        timeout = timedelta(seconds=timeout_s)
        store = _ATTEMPT_STORE = _attempt_store(timeout)
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
    global _AGENT_STORE
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = _AGENT_STORE = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"fssdp/attempt_{restart}", store)


def job_token() -> str:
    """An id of this job that a torchrun restart keeps (the run-directory lock recognises its
    own job by it): kept in the agent's store, which outlives the workers; else per process."""
    mine = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    if _AGENT_STORE is None:
        return mine
    return _AGENT_STORE.compare_set("fssdp/job_token", "", mine).decode()


# [Note: failure propagation]
# A rank that fails alone (its disk is full, its data file unreadable) exits with its one line;
# the others then see a collective fail ("connection closed") or time out, and would say "a rank
# stopped answering". So:
# - rank-0-only work (lock, run directory, manifest, renames) runs in `on_main`: rank 0 does it,
#   broadcasts the outcome, and every rank raises the same failure: nobody waits on a dead rank;
# - any other failure is written to the attempt's store (`report_failure`, first failure wins)
#   before the rank exits; a rank whose collective then fails reads it (`peer_failure`) and says
#   "rank r failed: …". Under torchrun the store lives in the agent, so it outlives the failing
#   rank; without torchrun rank 0 hosts it, and when rank 0 is the one that died, the others
#   can only say that it stopped answering.


def on_main(fn: Callable[[], T], is_main: bool) -> T:
    """Run `fn` on rank 0 only; every rank returns its result or raises its failure (UserError
    or OSError, as one line), so no rank is left waiting for a rank that already gave up. Any
    other exception (a bug) is still told to the other ranks, then raised on rank 0 as is."""
    result: Any = None
    error: str | None = None
    unexpected: BaseException | None = None
    if is_main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
        except OSError as e:
            error = os_error_line(e)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
            unexpected, error = e, f"{type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise UserError(error if is_main else f"rank 0 failed: {error}")
    return result


def _store() -> Any:
    """The store the ranks of this attempt share, with a short timeout (an error path must not
    wait parallel.timeout_s on a store whose host is gone)."""
    store = _ATTEMPT_STORE
    if store is None:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=5))
    return store


def report_failure(message: str) -> None:
    """Leave this rank's one line where the others can read it (first failure wins)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        _store().compare_set(_FAILURE_KEY, "", f"{dist.get_rank()}\t{message}")
    except Exception as e:  # noqa: BLE001 - the store may be gone with its host; say so, go on
        print(
            f"fssdp: warning: could not report the failure to the other ranks ({e})",
            file=sys.stderr,
        )


def peer_failure() -> str | None:
    """`rank r failed: …` when another rank reported a failure, else None. Without torchrun the
    store lives in rank 0: another rank asks only torchrun's agent store, which outlives the
    ranks (asking a dead rank 0 would print the store client's C++ warnings)."""
    if not dist.is_initialized() or (_ATTEMPT_STORE is None and dist.get_rank() != 0):
        return None
    try:
        store = _store()
        if not store.check([_FAILURE_KEY]):
            return None
        rank, _, message = store.get(_FAILURE_KEY).decode().partition("\t")
    except Exception:  # noqa: BLE001 - the store died with the failed rank: nothing to read
        return None
    if int(rank) == dist.get_rank():
        return None
    return f"rank {rank} failed: {message}"


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
