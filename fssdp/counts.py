"""A bank's per-call count all-gather, issued early when the model announces the call's routing.

Legend: N rows this rank routes into the bank in one call, E experts of the bank, W ranks.

[Note: announced routing]
Every bank call of ep/fssdp needs the [W, E] count matrix before its token all-to-all (the
send and receive splits, and fssdp's placement). Gathered at the call, it is one synchronous
round trip on the critical path per call. Some routings are known well before their call:
MoEUT's SwitchHead picks the output-projection experts together with the value experts, before
attention; SUT's MoA uses one selection for its query and output projections. The model says
so with `bank.announce(expert_N)` as soon as it knows; the count all-gather is then issued at
once (async, dispatch group) and the call finds it done: the exchange hides behind the value
bank's call and attention. The call checks that it routes exactly the announced counts (a
different call would consume another call's collective on some ranks only: a hang), and an
announcement inside a recomputation ([Note: recomputation reuse] in fssdp/recompute.py) is
ignored, since the call it announces replays its counts or is not re-run at all. The order of
collectives on the dispatch group stays the same on every rank: announcements and calls come
in the model's order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collectives.dispatch import PendingCounts, issue_all_gather_counts
from fssdp.dispatch import Exchange
from fssdp.recompute import current


class CountExchange:
    """The [W, E] count matrices of one bank's calls (EP and FSSDP executors)."""

    def __init__(self, ex: Exchange, num_experts: int) -> None:
        self.ex = ex
        self.num_experts = num_experts
        # The announced call's own counts (checked at the call) and its gather in flight.
        self._announced: tuple[Tensor, PendingCounts] | None = None
        self.announced_calls = 0  # calls that found their counts already issued (a counter)

    def _issue(self, expert_N: Tensor) -> tuple[Tensor, PendingCounts]:
        counts_E = torch.bincount(expert_N, minlength=self.num_experts)
        ex = self.ex
        with ex.phases.phase("dispatch"):
            pending = issue_all_gather_counts(
                counts_E, ex.group, phase=f"counts {ex.name}", timeout_s=ex.timeout_s
            )
        return counts_E, pending

    def announce(self, expert_N: Tensor) -> None:
        """Issue the count all-gather of this bank's next call now ([Note: announced routing])."""
        region = current()
        if region is not None and region.replaying:
            return
        if self._announced is not None:
            raise RuntimeError(
                f"bank {self.ex.name}: announced twice without a call in between; announce "
                "each call's routing once, right before or well before the call"
            )
        self._announced = self._issue(expert_N)

    def gather(self, expert_N: Tensor) -> Tensor:
        """[W, E] rows per rank per expert of this call (on the CPU)."""
        if self._announced is None:
            _, pending = self._issue(expert_N)
        else:
            announced_E, pending = self._announced
            self._announced = None
            counts_E = torch.bincount(expert_N, minlength=self.num_experts)
            if not torch.equal(counts_E.to(announced_E.device), announced_E):
                raise RuntimeError(
                    f"bank {self.ex.name}: the call routes other rows than were announced "
                    f"(counts {counts_E.tolist()} vs {announced_E.tolist()}); announce the "
                    "expert ids the call will use"
                )
            self.announced_calls += 1
        with self.ex.phases.phase("dispatch"):
            return pending.wait().cpu()
