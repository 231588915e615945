"""The control plane's host arrays: placements and counts as numpy, for the planners' kernels.

Legend: W ranks, E experts, P holder pairs of a placement (sorted by expert, then rank).

[Note: the control plane on the host]
A plan is a few hundred integer operations on arrays of a few hundred entries (the [W, E]
count matrix is a few KB). Issued as torch ops, each costs its dispatch (3-10 us on a CPU
thread, a kernel launch on a GPU) while the arithmetic is nanoseconds; the sum sits on the
critical path of every exact and calibrated bank step (measured at W = 8, E = 64: 0.6 ms of
the plan's 0.9 ms in `cut` alone). So the planners' kernels (fssdp/plan_exact.py) run on host
numpy arrays, 2-4x cheaper per op, and hand torch tensors back only where the runtime keeps
them (the placement it returns, on the counts' device). Placements keep their tensors; their
host view is made once per placement and cached on it. Integer arithmetic only, so every rank
still computes the same plan bit for bit.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from collectives.placement import Placement, PlannedRows


def host_array(x: Tensor) -> np.ndarray:
    """x as a numpy array (no copy for a CPU tensor)."""
    return x.detach().cpu().numpy()


def add_at(n: int, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int64 [n]: values summed by index (torch's index_add_ into zeros)."""
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, index, values)
    return out


def from_cells(
    base: Placement, cell_P: np.ndarray, planned: PlannedRows | None = None
) -> Placement:
    """The placement with `base`'s owners and the holder pairs of the sorted, unique cells
    cell_P (e * W + r; a planner's own, so not validated), its tensors on base's device."""
    W, dev = base.world_size, base.owner_E.device
    t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    return Placement._trusted(base.owner_E, t(cell_P // W), t(cell_P % W), W, planned, t(cell_P))


class HostPlacement:
    """A placement's arrays on the host, made once per placement (`host`)."""

    def __init__(self, p: Placement) -> None:
        pe, pr = p.pairs_P()
        self.world_size, self.num_experts = p.world_size, p.num_experts
        self.expert_P, self.rank_P = host_array(pe), host_array(pr)
        self.owner_E = host_array(p.owner_E)

    @cached_property
    def cell_P(self) -> np.ndarray:
        return self.expert_P * self.world_size + self.rank_P

    @cached_property
    def holders_EW(self) -> np.ndarray:
        """Bool [E, W]: True where rank w holds expert e."""
        m = np.zeros(self.num_experts * self.world_size, dtype=bool)
        m[self.cell_P] = True
        return m.reshape(self.num_experts, self.world_size)

    @cached_property
    def replicas_W(self) -> np.ndarray:
        """Per rank: replicas it holds (held, not owned)."""
        rep = self.rank_P != self.owner_E[self.expert_P]
        return np.bincount(self.rank_P[rep], minlength=self.world_size)


def host(p: Placement) -> HostPlacement:
    """The host view of `p`, cached on it ([Note: the control plane on the host])."""
    if "host" not in p._cache:
        p._cache["host"] = HostPlacement(p)
    return p._cache["host"]



