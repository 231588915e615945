"""'tree': per-expert binomial broadcast trees run side by side, round by round, point to point.

Legend: S elements per row; X rows of one message; A experts this rank relays in a reduce (it
holds a copy, is not the owner, and receives partial sums to pass on). The schedule and its
rounds are in collectives/schedule.py ([Note: binomial relay]).

# [Note: tree and async_op]
Round 0 only sends what owners already have; a relay may forward only what it has received, so
each later round is issued once the one before has landed. All of it runs on the group's worker
thread ([Note: rounds in the background] in collectives/progress.py), so with async_op the whole
tree progresses while the caller works, as a2a does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from collectives.algorithms.base import Algorithm, Finish, register
from collectives.comm import Call, issue_p2p
from collectives.placement import Topology
from collectives.rows import GatherRows, ReduceRows
from collectives.schedule import CostModel, Diff, RoundView, Schedule, tree_from


def _rounds(rounds: tuple[RoundView, ...], run: Callable[[RoundView], Finish]) -> Finish:
    """Issue round 0 now; the returned finish completes it and runs the rest in order."""
    first = run(rounds[0]) if rounds else None

    def finish() -> None:
        if first is not None:
            first()
        for rv in rounds[1:]:
            run(rv)()

    return finish


@register
class BinomialTree(Algorithm):
    """ceil(log2(n)) rounds for an expert with n - 1 new holders; no rank sends more than one
    copy of an expert per round, so a hot expert's owner stops being the bottleneck."""

    name = "tree"

    @classmethod
    def build_schedule(cls, diff: Diff, topology: Topology | None) -> Schedule:
        return tree_from(diff, topology)

    def cost(self, expert_bytes: int, cost_model: CostModel) -> float:
        return self.schedule.cost(expert_bytes, cost_model.round_bytes)

    def issue_gather(self, call: Call, rows: GatherRows) -> Finish:
        def run(rv: RoundView) -> Finish:
            sends = [(peer, rows.send(ex)) for peer, ex in rv.sends]  # relays read the output
            recvs, lands = [], []
            for peer, ex in rv.recvs:
                buf_XS, land = rows.receiver(ex)
                recvs.append((peer, buf_XS))
                lands.append(land)
            works = issue_p2p(call, sends, recvs)

            def done() -> None:
                call.wait(works)
                for land in lands:
                    land()

            return done

        return _rounds(self.view(call.rank, reduce=False).rounds, run)

    def issue_reduce(self, call: Call, rows: ReduceRows) -> Finish:
        return _TreeReduce(call, rows, self.view(call.rank, reduce=True).rounds).finish


class _TreeReduce:
    """Partial sums of one spRS by tree on one rank: in the output (owned experts) or in
    acc_AS (relayed). A relay's partial starts as its own copy + the first row it receives; an
    owner's follows [Note: folding] in rows.py (its copy first, when it has one)."""

    def __init__(self, call: Call, rows: ReduceRows, rounds: tuple[RoundView, ...]) -> None:
        self.rows = rows
        x = rows.x_XS
        relay = sorted({e for rv in rounds for _, ex in rv.recvs for e in ex} - set(rows.owned))
        self.relay_row = {e: i for i, e in enumerate(relay)}
        self.acc_AS = x.new_empty(len(relay), x.shape[1])
        self.started: set[int] = set()
        run_all = _rounds(rounds, lambda rv: self._run(call, rv))

        def finish() -> None:
            run_all()
            rows.complete([e for e in rows.owned if e not in self.started])

        self.finish = finish

    def _partial(self, e: int) -> torch.Tensor:
        rows = self.rows
        return rows.out_OS[rows.out_row[e]] if e in rows.out_row else self.acc_AS[self.relay_row[e]]

    def _send(self, ex: tuple[int, ...]) -> torch.Tensor:
        if not self.started.intersection(ex):
            return self.rows.local(ex).contiguous()
        x, row = self.rows.x_XS, self.rows.in_row
        return torch.stack([self._partial(e) if e in self.started else x[row[e]] for e in ex])

    def _land(self, ex: tuple[int, ...], got_XS: torch.Tensor) -> None:
        rows = self.rows
        for i, e in enumerate(ex):
            part = self._partial(e)
            if e in self.started:
                part.add_(got_XS[i])
                continue
            self.started.add(e)
            own = rows.x_XS[rows.in_row[e]] if rows.has_local(e) else None
            if e in rows.out_row and rows.accumulate:
                if own is not None:
                    part.add_(own)
                part.add_(got_XS[i])
            elif own is not None:
                torch.add(own, got_XS[i], out=part)
            else:  # an owner with no copy of its own (replicas_only): the first row as is
                part.copy_(got_XS[i])

    def _run(self, call: Call, rv: RoundView) -> Finish:
        sends = [(peer, self._send(ex)) for peer, ex in rv.sends]
        x = self.rows.x_XS
        recvs = [(peer, x.new_empty(len(ex), x.shape[1])) for peer, ex in rv.recvs]
        works = issue_p2p(call, sends, recvs)

        def done() -> None:
            call.wait(works)
            for (_, ex), (_, got_XS) in zip(rv.recvs, recvs):
                self._land(ex, got_XS)

        return done
