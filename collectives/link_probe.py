"""Measure the cost rule's constants on the group at hand (any backend), once at start-up.

Legend: W ranks; n message bytes. One message rank 0 -> rank 1 while the other ranks idle, as in
a sparse transfer: by all_to_all_single and by a point-to-point round, tiny and big.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from collectives.comm import backend_device, global_rank, group_rank_world
from collectives.schedule import DEFAULT_COST, CostModel

Group = dist.ProcessGroup | None


def _medians(
    fns: dict[str, Callable[[], None]], reps: int, group: Group, device: torch.device
) -> dict[str, float]:
    """Median over interleaved repeats of the slowest rank's time, identical on every rank."""
    sync = device.type == "cuda"
    dts: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps + 2):  # two warm-up rounds
        for k, fn in fns.items():
            dist.barrier(group)
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize(device)
            if i >= 2:
                dts[k].append(time.perf_counter() - t0)
    t = torch.tensor(list(dts.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # every rank gets the same numbers
    return {k: statistics.median(row) for k, row in zip(dts, t.cpu().tolist())}


def probe_cost_model(
    group: Group = None,
    *,
    reps: int = 20,
    big_bytes: int = 4 << 20,
    device: torch.device | None = None,
) -> tuple[CostModel, dict[str, float]]:
    """Measure (CostModel, raw timings). All ranks must call it; all get the same model, so
    choose_algorithm stays identical across ranks. World 1 returns DEFAULT_COST."""
    rank, W = group_rank_world(group)
    if W < 2:
        return DEFAULT_COST, {}
    dev = device or backend_device(group)
    buf = torch.zeros(big_bytes, dtype=torch.uint8, device=dev)
    rbuf = torch.empty_like(buf)

    def a2a(n: int) -> Callable[[], None]:
        send, recv = [0] * W, [0] * W
        send[1] = n if rank == 0 else 0
        recv[0] = n if rank == 1 else 0
        return lambda: dist.all_to_all_single(
            rbuf[: sum(recv)], buf[: sum(send)], recv, send, group=group
        )

    def p2p(n: int) -> Callable[[], None]:
        peer = {0: (dist.isend, buf, 1), 1: (dist.irecv, rbuf, 0)}.get(rank)

        def run() -> None:
            if peer is not None:
                op, t, p = peer
                for w in dist.batch_isend_irecv(
                    [dist.P2POp(op, t[:n], global_rank(group, p), group)]
                ):
                    w.wait()

        return run

    fns = {
        "a2a_small": a2a(4),
        "a2a_big": a2a(big_bytes),
        "p2p_small": p2p(4),
        "p2p_big": p2p(big_bytes),
    }
    t = _medians(fns, reps, group, dev)
    beta = statistics.mean(
        [(t["a2a_big"] - t["a2a_small"]) / big_bytes, (t["p2p_big"] - t["p2p_small"]) / big_bytes]
    )
    beta = max(beta, 1e-12)
    model = CostModel(
        a2a_peer_bytes=t["a2a_small"] / (W - 1) / beta, round_bytes=t["p2p_small"] / beta
    )
    raw = {f"{k}_s": v for k, v in t.items()} | {"bandwidth_GBps": 1e-9 / beta}
    return model, raw
