"""`parallel=fssdp`: experts sharded whole, hot experts materialised per step.

Dense parameters go to FSDP2; every bank keeps its owned rows as parameters, gets a placement
policy (fssdp/policy.py), a replica state machine (fssdp/replicas.py) and an executor
(fssdp/executor.py). The end of a step (the optimizer's post-hook) feeds every policy the
step's global load and, when a policy plans ahead, the timings agreed over ranks; every K steps
it re-shards ownership (fssdp/reshard.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from collectives.comm import backend_device
from collectives.placement import Placement, Topology
from fssdp.config import ParallelConfig
from fssdp.copy_bandwidth import LinkBandwidth, probe_links
from fssdp.executor import BankStep, FSSDPExecutor
from fssdp.expert_params import RowLayout
from fssdp.phases import PhaseTimer
from fssdp.planner import LoadEstimator, Locality
from fssdp.policy import (
    AgreedTiming,
    CalibratePolicy,
    ExactPolicy,
    PlacementPolicy,
    PredictPolicy,
)
from fssdp.replicas import Replicas
from fssdp.reshard import reshard_bank
from fssdp.sharding import balanced_uniform_sharding, heterogeneous_sharding
from fssdp.strategies.base import LocalMetrics
from fssdp.strategies.registry import register
from fssdp.strategies.sharded import ExpertSharded
from models.common.experts import ExpertBank


@register("fssdp")
class FSSDPParallel(ExpertSharded):
    def __init__(
        self, model: nn.Module, cfg: ParallelConfig, topology: Topology, units: list[nn.Module]
    ) -> None:
        banks = {m.bank_name: m.num_experts for m in model.modules() if isinstance(m, ExpertBank)}
        super().__init__(model, cfg, topology, units, balanced_uniform_sharding(banks, topology))
        self.layouts = {name: RowLayout.of(bank) for name, bank in self.banks.items()}
        # per-link bytes/s and the slower link's figure that policies budget copies with,
        # measured in _after_materialize ([Note: copies per link] in fssdp/copy_bandwidth.py)
        self.links = LinkBandwidth()
        self.bandwidth = 1e9
        self.policies = {name: self._policy(name) for name in self.banks}
        # Global load per bank over the last steps: the input of re-sharding (all modes).
        self.load = {
            name: LoadEstimator(bank.num_experts, cfg.load_window)
            for name, bank in self.banks.items()
        }
        self.executors: dict[str, FSSDPExecutor] = {}
        for name, bank in self.banks.items():
            replicas = Replicas(
                self.layouts[name],
                lambda b=bank: dict(b.named_parameters(recurse=False)),
                topology,
                self.rank,
                self.sparse_group,
                cfg.collective_algorithm,
                cfg.timeout_s,
                name,
                self.compute_dtype,
            )
            ex = FSSDPExecutor(
                bank,
                self.policies[name],
                replicas,
                self.count_exchanges[name],
                cfg.rematerialize,
                self.compute_dtype,
            )
            self.executors[name] = bank.executor = ex
        self._prefetch_hooks(units)
        self.steps_done = 0

    def _policy(self, name: str) -> PlacementPolicy:
        cfg, own = self.cfg, Placement.from_owners(self.owner[name], self.world)
        if cfg.plan_mode == "exact":
            return ExactPolicy(
                own, self.topology, cfg.memory_cap, cfg.cost_aware, self._row_bytes(name),
                locality=self._locality(name),
            )
        cls = PredictPolicy if cfg.plan_mode == "predict" else CalibratePolicy
        return cls(
            own,
            self.topology,
            cfg.memory_cap,
            cfg.load_window,
            cfg.overlap_degree,
            self._row_bytes(name),
            self.bandwidth,
        )

    def _row_bytes(self, name: str) -> int:
        """Bytes of one replica row of bank `name` (the compute dtype's under bf16)."""
        lay = self.layouts[name]
        dtype = self.compute_dtype or lay.dtype
        return lay.numel * torch.empty((), dtype=dtype).element_size()

    def _locality(self, name: str) -> Locality | None:
        """What [Note: node-local replicas] weighs for bank `name` (None: off)."""
        cfg, bank, lay = self.cfg, self.banks[name], self.layouts[name]
        slots = cfg.memory_cap - 1 if cfg.node_local_slots < 0 else cfg.node_local_slots
        if slots <= 0:
            return None
        elem = torch.empty((), dtype=self.compute_dtype or lay.dtype).element_size()
        token = 2 * (bank.in_features + bank.out_features) * elem
        return Locality(token, 2 * self._row_bytes(name), slots)

    def _prefetch_hooks(self, units: list[nn.Module]) -> None:
        """Issue each bank's spAG when its unit starts, so it overlaps the unit's dense work."""
        if not any(p.prefetches for p in self.policies.values()):
            return
        for unit in units:
            inside = [
                ex for ex in self.executors.values() if any(ex.bank is m for m in unit.modules())
            ]
            if inside:
                unit.register_forward_pre_hook(lambda mod, args, exs=inside: _prefetch(exs))

    def _after_materialize(self) -> None:
        if any(p.timed for p in self.policies.values()) and self.world > 1:
            self.links = self._measure_links()
            self.bandwidth = self.links.degree_bandwidth or self.bandwidth
            for policy in self.policies.values():
                if isinstance(policy, (PredictPolicy, ExactPolicy)):
                    policy.bandwidth = self.bandwidth

    def _measure_links(self) -> LinkBandwidth:
        """[Note: copies per link] (fssdp/copy_bandwidth.py) on the bank with the largest rows."""
        name = max(self.layouts, key=lambda n: self.layouts[n].row_bytes())
        rows = self.layouts[name].pack(dict(self.banks[name].named_parameters(recurse=False)))
        return probe_links(
            rows.to(self.compute_dtype or rows.dtype),  # what the spAG moves
            self.policies[name].ownership,
            self.topology,
            self.sparse_group,
            self.cfg.collective_algorithm,
            self.cfg.timeout_s,
        )

    # -- the step -----------------------------------------------------------------------------
    def _set_sync(self, sync: bool) -> None:
        super()._set_sync(sync)
        for ex in self.executors.values():
            ex.replicas.sync = sync

    @contextmanager
    def statistics_pass(self) -> Iterator[None]:
        """The banks record the step's counts (one exact plan per step) and run as EP."""
        for ex in self.executors.values():
            ex.prepass = True
        try:
            yield
        finally:
            for ex in self.executors.values():
                ex.prepass = False

    def finish_backward(self) -> None:
        for ex in self.executors.values():
            ex.finish(self.world)

    def end_step(self) -> None:
        """The optimizer's post-hook: close the step, feed the policies, maybe re-shard."""
        with self.phases.phase("plan"):
            steps = {name: ex.end_step() for name, ex in self.executors.items()}
            self._last = self._metrics(steps)
            self.steps_done += 1
            timing = self._agree_timing(steps)
            for name, st in steps.items():
                if st.counts_E is not None:
                    self.load[name].update(st.counts_E.tolist())
            if self.cfg.reshard_every and self.steps_done % self.cfg.reshard_every == 0:
                self._reshard()
            for name, st in steps.items():
                self.policies[name].end_step(st.counts_E, timing.get(name, AgreedTiming()))

    def _agree_timing(self, steps: dict[str, BankStep]) -> dict[str, AgreedTiming]:
        """Overlap time and compute time per row per bank, the same on every rank: the
        planner runs on every rank and must reach the same placement (max over ranks: plan for
        the slowest). Only policies that price transfers read them (predict, calibrate, exact
        when cost-aware); without any, no all-reduce.
        """
        names = [n for n, p in self.policies.items() if p.timed]
        if not names:
            return {}
        overlap = [steps[n].overlap_s for n in names if steps[n].overlap_s > 0]
        per_row = [
            steps[n].expert_time_s / steps[n].rows_computed if steps[n].rows_computed else 0.0
            for n in names
        ]
        t = torch.tensor(
            [min(overlap) if overlap else 0.0, *per_row],
            dtype=torch.float64,
            device=backend_device(),
        )
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        vals = t.cpu().tolist()
        return {n: AgreedTiming(vals[0], row_s) for n, row_s in zip(names, vals[1:])}

    def _reshard(self) -> None:
        aside = {
            n: p.degree() if isinstance(p, PredictPolicy) else self.cfg.memory_cap
            for n, p in self.policies.items()
        }
        loads = {n: est.estimate() for n, est in self.load.items()}
        new_owner = heterogeneous_sharding(loads, self.topology, aside)
        for name, owners in new_owner.items():
            if owners == self.owner[name]:
                continue
            reshard_bank(
                self.banks[name],
                self.opt,
                Placement.from_owners(self.owner[name], self.world),
                Placement.from_owners(owners, self.world),
                self.sparse_group,
                self.cfg.timeout_s,
            )
            self.owner[name] = owners
            self.policies[name].set_ownership(Placement.from_owners(owners, self.world))

    # -- accounting ---------------------------------------------------------------------------
    def instrument(self, timer: PhaseTimer) -> None:
        super().instrument(timer)
        for ex in self.executors.values():
            ex.replicas.phases = timer

    def _metrics(self, steps: dict[str, BankStep]) -> LocalMetrics:
        out = super().collect_step()
        for key in ("spag", "sprs", "a2a"):
            out.comm_bytes[key] = sum(st.bytes[key] for st in steps.values())
        out.expert_time_s = sum(st.expert_time_s for st in steps.values())
        out.rows_computed = sum(st.rows_computed for st in steps.values())
        out.replicas = {
            name: (st.placement or self.policies[name].ownership).num_replicas()
            for name, st in steps.items()
        }
        return out

    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state, plus the replica capacity: `memory_cap`
        experts per bank, their values (one bank's at a time under rematerialisation, which
        frees them after each forward) and their gradients (held until `finish_backward`)."""
        per_bank = [self.cfg.memory_cap * self._row_bytes(n) for n in self.layouts]
        values = max(per_bank, default=0) if self.cfg.rematerialize else sum(per_bank)
        return super().state_bytes() + values + sum(per_bank)


def _prefetch(executors: list[FSSDPExecutor]) -> None:
    for ex in executors:
        ex.prefetch()
