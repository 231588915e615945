"""One bank's replicas through a step: gather, hold, free/refill, reduce (an explicit state
machine, as FSDP2's `FSDPParamGroup` / `ShardedState`).

Legend: O experts this rank owns, R replicas it holds this step, T = O + R, S elements per
expert, W ranks.

[Note: replica states]
    IDLE --gather--> GATHERING --wait--> HELD --free--> FREED --refill--> HELD
    HELD --(the replicas' last backward use)--> REDUCING --finish--> REDUCED --reset--> IDLE
Under gradient accumulation the replicas stay HELD across the step's micro-batches (one
placement per step, their `.grad` accumulating): the hook starts the reduce only in the last
micro-batch's backward ([Note: sync per step] in fssdp/strategies/base.py).
A step whose placement has no replica anywhere skips every transfer (`transfers` is False on
every rank alike: placements are identical across ranks) and keeps no gradient leaf: its calls
run as EP's ([Note: a step without replicas runs as EP] in fssdp/executor.py). The replicas
are one leaf tensor `[R, S]` per step; every call's backward accumulates into its `.grad`, and
autograd runs the leaf's accumulation once, after the bank's last backward use: its hook
issues the spRS. Each call ties its output to the leaf (`fssdp.dispatch.Tie`), so the hook
fires on every rank, even one that holds no replica or computes no row (the others wait in the
collective otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto

import torch
import torch.distributed as dist
from torch import Tensor

from collectives.placement import Placement, Topology
from collectives.sparse import SparseHandle, sparse_all_gather, sparse_reduce_scatter
from fssdp.expert_params import RowLayout
from fssdp.phases import NULL_TIMER, PhaseTimer


class ReplicaState(Enum):
    IDLE = auto()
    GATHERING = auto()
    HELD = auto()
    FREED = auto()
    REDUCING = auto()
    REDUCED = auto()


class Replicas:
    """The replicas of one bank on this rank, and the collectives that move them."""

    def __init__(
        self,
        layout: RowLayout,
        owned: Callable[[], dict[str, Tensor]],
        topology: Topology,
        rank: int,
        group: dist.ProcessGroup | None,
        algorithm: str,
        timeout_s: float,
        name: str,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.layout, self.topology, self.rank, self.group = layout, topology, rank, group
        # Replicas travel and compute in this dtype (bf16: half the spAG bytes); their
        # gradients are cast up to the parameters' dtype before the spRS ([Note: mixed
        # precision of experts] in fssdp/precision.py).
        self.dtype = compute_dtype or layout.dtype
        self.algorithm, self.timeout_s, self.name = algorithm, timeout_s, name
        # The bank's owned rows (its parameters), packed into spAG sources.
        self.owned = owned
        self.phases: PhaseTimer = NULL_TIMER  # the trainer's timer (timing points only)
        self.bytes = {"spag": 0, "sprs": 0}  # sent this step, by collective
        self.spag_bytes_recv = 0  # received this step (bandwidth estimates)
        # False in the backward of a micro-batch that is not the step's last: the replicas'
        # gradients accumulate in the leaf's .grad, no spRS ([Note: sync per step]).
        self.sync = True
        self._reset()

    def _reset(self) -> None:
        self.state = ReplicaState.IDLE
        self.placement: Placement | None = None  # this step's P1
        self.ownership: Placement | None = None  # P0 at gather time
        self.leaf: Tensor | None = None  # [R, S] replicas (a leaf when training)
        self.ids: list[int] = []  # expert id of each replica row
        self._pending: SparseHandle | None = None
        self._reduce: SparseHandle | None = None

    def _assert_in(self, *states: ReplicaState) -> None:
        if self.state not in states:
            raise AssertionError(
                f"bank {self.name}: replicas in state {self.state.name}, expected "
                f"{'/'.join(s.name for s in states)}"
            )

    @property
    def transfers(self) -> bool:
        """Whether this step's placement has any replica anywhere (the same on every rank)."""
        return self.placement is not None and not self.placement.is_ownership_only()

    # -- gather -------------------------------------------------------------------------------
    def gather(self, ownership: Placement, placement: Placement) -> None:
        """Issue the spAG of `placement` (async); owned rows are packed from the parameters."""
        self._assert_in(ReplicaState.IDLE)
        self.ownership, self.placement = ownership, placement
        self.ids = [e for e in placement.held(self.rank) if ownership.owner[e] != self.rank]
        self.state = ReplicaState.GATHERING
        if not self.transfers:
            return
        with torch.no_grad():
            owned_OS = self._owned_rows()
        self._pending = self._spag(owned_OS, ownership, placement, "spag")

    def _owned_rows(self) -> Tensor:
        """[O, S] packed copies of the owned rows, in the transfer dtype."""
        return self.layout.pack({k: v.detach().to(self.dtype) for k, v in self.owned().items()})

    def _spag(self, rows: Tensor, src: Placement, dst: Placement, what: str) -> SparseHandle:
        handle = sparse_all_gather(
            rows,
            src,
            dst,
            self.group,
            async_op=True,
            algorithm=self.algorithm,
            phase=f"{what} {self.name}",
            timeout_s=self.timeout_s,
            topology=self.topology,
        )
        assert isinstance(handle, SparseHandle)
        self.bytes["spag"] += handle.stats.bytes_sent
        self.spag_bytes_recv += handle.stats.bytes_recv
        return handle

    def wait(self, device: torch.device, training: bool) -> Tensor:
        """The [R, S] replicas of this step (waiting for the spAG)."""
        if self.state is ReplicaState.HELD:
            assert self.leaf is not None
            return self.leaf
        if self.state is ReplicaState.FREED:
            self.refill()
            assert self.leaf is not None
            return self.leaf
        self._assert_in(ReplicaState.GATHERING)
        assert self.placement is not None
        if self._pending is None:
            rows_RS = torch.empty(0, self.layout.numel, dtype=self.dtype, device=device)
        else:
            held_TS = self._pending.wait()
            self._pending = None
            rows_RS = held_TS.index_select(0, self._replica_rows(device))
        self._hold(rows_RS, training)
        self.state = ReplicaState.HELD
        return rows_RS

    def _hold(self, rows_RS: Tensor, training: bool) -> None:
        """Keep `rows_RS` as this step's replicas: a leaf whose accumulated gradient starts the
        reduce, when training with replicas somewhere (else no call ties to it: EP's path,
        [Note: a step without replicas runs as EP] in fssdp/executor.py)."""
        if training and self.transfers:
            rows_RS.requires_grad_(True)
            rows_RS.register_post_accumulate_grad_hook(self._start_reduce)
        self.leaf = rows_RS

    def _replica_rows(self, device: torch.device) -> Tensor:
        """Positions of the replicas among this rank's held experts (spAG output order)."""
        assert self.placement is not None
        pos = {e: i for i, e in enumerate(self.placement.held(self.rank))}
        return torch.tensor([pos[e] for e in self.ids], dtype=torch.long, device=device)

    def extend(self, better: Placement, device: torch.device) -> Tensor:
        """Calibration: hold `better`'s replicas instead of this step's, gathering now only the
        pairs the held placement lacks ([Note: re-planning the prefetched slots] in
        fssdp/plan_exact.py); replicas `better` drops are let go."""
        self._assert_in(ReplicaState.HELD)
        held, ownership = self.placement, self.ownership
        assert held is not None and ownership is not None and self.leaf is not None
        union = held.with_pairs(*better.pairs_P())
        with torch.no_grad():
            held_FS = self._held_rows(held, self.leaf.detach())
            if union.pairs_P()[0].numel() > held.pairs_P()[0].numel():
                held_FS = self._spag(held_FS, held, union, "spag-calibrate").wait()
        pos = {e: i for i, e in enumerate(union.held(self.rank))}
        self.placement = better
        self.ids = [e for e in better.held(self.rank) if ownership.owner[e] != self.rank]
        index = torch.tensor([pos[e] for e in self.ids], dtype=torch.long, device=device)
        rows_RS = held_FS.index_select(0, index)
        self._hold(rows_RS, training=True)
        return rows_RS

    def _held_rows(self, placement: Placement, replicas_RS: Tensor) -> Tensor:
        """[F, S] every row this rank holds under `placement` (owned and replicas, by expert
        id): the spAG input when the held replicas are sources too."""
        held = placement.held(self.rank)
        mine = [i for i, e in enumerate(held) if placement.owner[e] == self.rank]
        theirs = [i for i, e in enumerate(held) if placement.owner[e] != self.rank]
        dev = replicas_RS.device
        out = replicas_RS.new_empty(len(held), self.layout.numel)
        out[torch.tensor(mine, dtype=torch.long, device=dev)] = self._owned_rows().to(dev)
        out[torch.tensor(theirs, dtype=torch.long, device=dev)] = replicas_RS
        return out

    # -- rematerialisation --------------------------------------------------------------------
    def free(self) -> None:
        """Drop the replicas' storage; autograd's saved views keep the storage object, which
        `refill` fills again before backward (no version bump: storage ops)."""
        self._assert_in(ReplicaState.HELD)
        if self.transfers:
            assert self.leaf is not None
            self.leaf.untyped_storage().resize_(0)
            self.state = ReplicaState.FREED

    def refill(self) -> None:
        if self.state is not ReplicaState.FREED:
            return
        assert self.leaf is not None and self.placement is not None
        assert self.ownership is not None
        with self.phases.phase("spag"), torch.no_grad():
            handle = self._spag(
                self._owned_rows(), self.ownership, self.placement,
                "spag-rematerialize",
            )
            fresh = handle.wait().index_select(0, self._replica_rows(self.leaf.device))
            storage = self.leaf.untyped_storage()
            storage.resize_(fresh.untyped_storage().nbytes())
            storage.copy_(fresh.untyped_storage())
        self.state = ReplicaState.HELD

    # -- reduce -------------------------------------------------------------------------------
    def _start_reduce(self, leaf: Tensor) -> None:
        """After the bank's last backward use: fold the replicas' gradients into the owners."""
        self._assert_in(ReplicaState.HELD)
        if not self.sync:  # a micro-batch before the step's last: keep accumulating
            return
        self.state = ReplicaState.REDUCING
        if not self.transfers:
            return
        assert leaf.grad is not None and self.placement is not None and self.ownership is not None
        with self.phases.phase("sprs"):
            held_TS = leaf.grad.new_zeros(
                len(self.placement.held(self.rank)), self.layout.numel, dtype=self.layout.dtype
            )  # fp32 under bf16: the gradients are cast up before they are summed
            held_TS.index_copy_(0, self._replica_rows(leaf.device), leaf.grad.to(held_TS.dtype))
            self._reduce = sparse_reduce_scatter(
                held_TS,
                self.placement,
                self.ownership,
                self.group,
                async_op=True,
                algorithm=self.algorithm,
                phase=f"sprs {self.name}",
                timeout_s=self.timeout_s,
                topology=self.topology,
            )
            self.bytes["sprs"] += self._reduce.stats.bytes_sent
        # The values are not needed after their last backward use: release them now.
        leaf.untyped_storage().resize_(0)

    def finish(self) -> Tensor | None:
        """The replicas' gradients summed per owned expert, [O, S] (None: nothing to add)."""
        if self.state is ReplicaState.IDLE:
            return None
        if self.state is ReplicaState.HELD and self.leaf is not None and self.leaf.requires_grad:
            raise RuntimeError(
                f"rank {self.rank}: bank {self.name} was used but its gradient reduce never "
                "started (was backward run?)"
            )
        self._assert_in(ReplicaState.REDUCING, ReplicaState.HELD)
        out = None
        if self._reduce is not None:
            with self.phases.phase("sprs"):
                out = self._reduce.wait()
        self.state = ReplicaState.REDUCED
        return out

    def end_step(self) -> Placement | None:
        """Reset for the next step; the placement this step ran with."""
        used = self.placement
        self._reset()
        self.bytes = {"spag": 0, "sprs": 0}
        self.spag_bytes_recv = 0
        return used
