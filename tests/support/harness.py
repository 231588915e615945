"""Multi-process test harness: run a function on W gloo ranks and collect what each returns.

Every distributed test in this suite goes through `run_distributed`. Ranks are forked from a
forkserver that has imported torch and the project once and run one warm-up step
(`PRELOAD`, tests/support/warm.py): a fresh interpreter per rank
(the "spawn" method) costs 3-9 s of imports per call on a 2-core machine, which summed to minutes
over the suite. The server is a clean single-threaded process started on first use, so forking
from it is safe (unlike forking pytest itself, which may hold threads and process groups); each
rank still gets a fresh copy, nothing carries over between calls. Tests should still run many
cases inside one call rather than one call per case.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What the forkserver imports once; every rank is forked with these loaded.
PRELOAD = [
    "torch",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "hydra",
    "omegaconf",
    "launch.build",
    "launch.train",
    "launch.trainer",
    "fssdp.api",
    "models.registry",
    "tests.support.parity",
    "tests.support.warm",  # last: one warm-up step, so forked ranks skip first-use costs
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
    timeout_s: float,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world_size, *args)
        # Tensors are serialised to bytes: a tensor sent through the queue shares memory with a
        # process that exits right after, and the parent would read a dead handle.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank.

    `fn` must be importable (a module-level function). Raises with every failing rank's traceback.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (first call only)
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    for _ in range(world_size):
        try:
            rank, status, payload = queue.get(timeout=timeout_s + 60)
        except Exception as e:  # queue.Empty: a rank hung or died without reporting
            errors.append(f"no result from some rank within {timeout_s + 60}s ({e!r})")
            break
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
