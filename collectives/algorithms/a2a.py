"""'a2a': one uneven all_to_all_single; each owner sends straight to every new holder.

Legend: S elements per row; W ranks; X rows this rank sends, R rows it receives (ordered by peer,
then expert: the splits follow from the schedule, which every rank knows, so no counts are
exchanged first); O owned rows; C contributions to them (received rows and own copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from collectives.algorithms.base import Algorithm, Finish, register
from collectives.comm import Call, issue_a2a
from collectives.placement import Topology
from collectives.rows import GatherRows, ReduceRows
from collectives.schedule import CostModel, Diff, Message, RoundView, Schedule, direct_from


def _counts(msgs: Sequence[Message], world: int) -> list[int]:
    c = [0] * world
    for peer, ex in msgs:
        c[peer] = len(ex)
    return c


def _flat(msgs: Sequence[Message]) -> list[int]:
    return [e for _, ex in msgs for e in ex]


@register
class AllToAll(Algorithm):
    """The direct schedule as one collective: a single latency, the owner's links carry every
    copy of its experts (no relays)."""

    name = "a2a"

    @classmethod
    def build_schedule(cls, diff: Diff, topology: Topology | None) -> Schedule:
        return direct_from(diff)

    def cost(self, expert_bytes: int, cost_model: CostModel) -> float:
        latency = cost_model.a2a_peer_bytes * (self.big.world_size - 1)
        return self.schedule.cost(expert_bytes, latency)

    def _round(self, rank: int, reduce: bool) -> RoundView:
        rounds = self.view(rank, reduce).rounds
        return rounds[0] if rounds else RoundView((), ())

    def issue_gather(self, call: Call, rows: GatherRows) -> Finish:
        if not self.schedule.num_transfers:  # nothing moves anywhere: every rank skips alike
            return lambda: None
        rnd = self._round(call.rank, reduce=False)
        recv_RS, land = rows.receiver(_flat(rnd.recvs))  # in place when one run of the output
        work = issue_a2a(
            call,
            rows.send(_flat(rnd.sends)),
            recv_RS,
            _counts(rnd.sends, call.world),
            _counts(rnd.recvs, call.world),
        )

        def finish() -> None:
            call.wait([work])
            land()

        return finish

    def issue_reduce(self, call: Call, rows: ReduceRows) -> Finish:
        rnd = self._round(call.rank, reduce=True)
        keys = [(s, e) for s, ex in rnd.recvs for e in ex]  # recv_RS rows: by (src, e)
        recv_RS = rows.x_XS.new_empty(len(keys), rows.x_XS.shape[1])
        work = None
        if self.schedule.num_transfers:  # else nothing moves anywhere: all ranks skip alike
            send_XS = rows.local(_flat(rnd.sends)).contiguous()
            work = issue_a2a(
                call,
                send_XS,
                recv_RS,
                _counts(rnd.sends, call.world),
                _counts(rnd.recvs, call.world),
            )

        def finish() -> None:
            if work is not None:
                call.wait([work])
            fold_in_rank_order(call.rank, rows, keys, recv_RS)

        return finish


def fold_in_rank_order(
    rank: int, rows: ReduceRows, keys: list[tuple[int, int]], recv_RS: torch.Tensor
) -> None:
    """Fold each owned expert's copies in ascending holder rank order ([Note: deterministic
    sums] in sparse.py): slot k of every owned expert is its k-th contribution, so each slot
    is one batched write or add for the local rows and one for the received rows."""
    contrib = [(rows.out_row[e], s, False, i) for i, (s, e) in enumerate(keys)]
    contrib += [
        (o, rank, True, rows.in_row[e]) for o, e in enumerate(rows.owned) if rows.has_local(e)
    ]
    contrib.sort()  # by (owned row, holder rank): (o, rank) pairs are unique
    slots: list[tuple[list[int], list[int], list[int], list[int]]] = []
    prev, k = -1, 0
    for o, _, local, i in contrib:
        k = k + 1 if o == prev else 0
        prev = o
        if k == len(slots):
            slots.append(([], [], [], []))
        lo, li, ro, ri = slots[k]
        (lo if local else ro).append(o)
        (li if local else ri).append(i)
    for k, (lo, li, ro, ri) in enumerate(slots):
        if lo:
            rows.fold_from(lo, rows.x_XS, li, first=k == 0)
        if ro:
            rows.fold_from(ro, recv_RS, ri, first=k == 0)
    touched = {o for o, _, _, _ in contrib}
    rows.complete([e for o, e in enumerate(rows.owned) if o not in touched])
