"""Every rank's small metrics vector to every rank, in one collective (rank order)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_rows(values: list[float], device: torch.device) -> list[list[float]]:
    """values[i] of each rank as rows: out[r] is rank r's list (every rank calls, same length)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = torch.empty(world * len(values), dtype=torch.float64, device=device)
    dist.all_gather_single(out, t)
    return out.view(world, len(values)).cpu().tolist()
