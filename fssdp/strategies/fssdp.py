"""`parallel=fssdp`: experts sharded whole, hot experts materialised per step (DESIGN.md §2).

Dense parameters go to FSDP2; every expert bank's parameters move into the per-rank
`ExpertStore` (owned experts only) and the bank gets a `BankRuntime` executor.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from collectives.comm import backend_device
from collectives.placement import Placement, Topology
from collectives.sparse import sparse_all_gather
from fssdp.config import PLAN_MODES, ParallelConfig
from fssdp.dense import layers, shard_dense
from fssdp.executor import BankRuntime, ExecOptions
from fssdp.groups import side_groups
from fssdp.layout import ExpertLayout
from fssdp.phases import NULL_TIMER, PhaseTimer
from fssdp.planner import LoadEstimator, overlap_degree, plan_placement
from fssdp.sharding import balanced_uniform_sharding, heterogeneous_sharding
from fssdp.store import ExpertStore
from fssdp.strategies.base import Parallelized
from fssdp.strategies.state import layout_state_dict, load_layout
from models.common.experts import ExpertBank


class FSSDPParallel(Parallelized):
    name = "fssdp"
    # EP is this strategy with no replicas, static owners and no re-sharding.
    replicate = True

    def __init__(self, model: nn.Module, cfg: ParallelConfig, ranks_per_node: int) -> None:
        if cfg.plan_mode not in PLAN_MODES:
            raise ValueError(f"parallel.plan_mode={cfg.plan_mode!r}: use one of {PLAN_MODES}")
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.topology = Topology(self.world, ranks_per_node)
        # Sparse collectives and token dispatch get groups of their own
        # ([Note: three process groups] in fssdp/executor.py).
        self.sparse_group, self.dispatch_group = side_groups()
        banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
        if not banks:
            raise ValueError(f"parallel={self.name}: the model has no expert bank")
        self.store = ExpertStore(self.rank, self.world, self.sparse_group)
        owners = self.initial_owners({b.bank_name: b.num_experts for b in banks})
        opts = ExecOptions(
            plan_mode=cfg.plan_mode if self.replicate else "predict",
            memory_cap=cfg.memory_cap if self.replicate else 0,
            rematerialize=cfg.rematerialize,
            algorithm=cfg.collective_algorithm,
            timeout_s=cfg.timeout_s,
        )
        self.runtimes: dict[str, BankRuntime] = {}
        self.estimators: dict[str, LoadEstimator] = {}
        for bank in banks:
            self._take_bank(bank, owners[bank.bank_name], opts)
        self._prefetch_hooks(model, banks)
        self._dense_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        super().__init__(shard_dense(model))
        self._last: dict[str, Any] = {}  # the finished step's figures, for metrics
        self._phases: PhaseTimer = NULL_TIMER
        # Sparse-transfer bandwidth (bytes/s), measured once and agreed over ranks.
        self.bandwidth = self._measure_bandwidth()
        for rt in self.runtimes.values():
            rt.bandwidth = self.bandwidth
        self.steps_done = 0

    # -- set-up ------------------------------------------------------------------------------
    def initial_owners(self, banks: dict[str, int]) -> dict[str, list[int]]:
        return balanced_uniform_sharding(banks, self.topology)

    def _take_bank(self, bank: ExpertBank, owner: list[int], opts: ExecOptions) -> None:
        layout = ExpertLayout.of(bank)
        with torch.no_grad():
            full_ES = layout.flatten(bank.stacked())
        shard = self.store.add_bank(layout, full_ES, Placement.from_owners(owner, self.world))
        for name in layout.names:  # the bank keeps no weights: the store owns them now
            delattr(bank, name)
        runtime = BankRuntime(
            shard, self.topology, opts, self.rank, self.sparse_group, self.dispatch_group
        )
        bank.executor = runtime
        self.runtimes[layout.bank_name] = runtime
        self.estimators[layout.bank_name] = LoadEstimator(bank.num_experts, self.cfg.load_window)

    def _prefetch_hooks(self, model: nn.Module, banks: list[ExpertBank]) -> None:
        """Issue each bank's spAG when its layer starts, so it overlaps the layer's dense work."""
        for layer in layers(model):
            inside = [
                self.runtimes[b.bank_name] for b in banks if any(b is m for m in layer.modules())
            ]
            if inside:
                layer.register_forward_pre_hook(lambda mod, args, rts=inside: _prefetch(rts))

    # -- the step ----------------------------------------------------------------------------
    def finish_backward(self) -> None:
        for rt in self.runtimes.values():
            rt.finish()

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        dense = [p.grad for _, p in self.named_optimizer_params() if p.grad is not None]
        dense_norm = torch.nn.utils.get_total_norm(dense) if dense else torch.zeros(())
        if hasattr(dense_norm, "full_tensor"):
            dense_norm = dense_norm.full_tensor()
        expert_sq = self.store.grad_sq_norm().to(backend_device())  # NCCL: on the GPU
        if self.world > 1:
            dist.all_reduce(expert_sq)
        total = math.sqrt(float(dense_norm) ** 2 + float(expert_sq))
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            torch.nn.utils.clip_grads_with_norm_(
                [p for _, p in self.named_optimizer_params()],
                max_norm,
                torch.tensor(total, dtype=torch.float64),
            )
            self.store.scale_grads(coef)
        return torch.tensor(total)

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        opt.step()
        self.store.adamw_step(opt.param_groups[0])
        self.store.zero_grad()
        self.steps_done += 1
        with self._phases.phase("plan"):
            self._end_step()

    def _end_step(self) -> None:
        stats = {name: rt.end_step() for name, rt in self.runtimes.items()}
        self._last = {"stats": stats}
        for name, st in stats.items():
            if st.counts_E is not None:
                self.estimators[name].update(st.counts_E.tolist())
        # Timings feed predict/calibrate planning and re-sharding's set-aside degree only;
        # exact mode measures no overlap (nothing is prefetched) and EP plans nothing.
        planning = self.replicate and self.cfg.plan_mode != "exact"
        overlap = self._agree_timing(stats) if planning else 0.0
        if (
            self.replicate
            and self.cfg.reshard_every
            and (self.steps_done % self.cfg.reshard_every == 0)
        ):
            self._reshard(overlap, self.bandwidth)
        if planning:  # exact mode plans inside the step
            for name, rt in self.runtimes.items():
                rt.next_placement = plan_placement(
                    self.estimators[name].estimate(),
                    rt.shard.ownership,
                    self.topology,
                    self._degree(rt, overlap, self.bandwidth),
                    self.cfg.memory_cap,
                )

    def _agree_timing(self, stats: dict[str, Any]) -> float:
        """Overlap time (returned) and per-bank compute time per row (set on the runtimes),
        the same on every rank: the planner runs on every rank and must reach the same
        placement (max over ranks: plan for the slowest)."""
        overlap = [st.overlap_s for st in stats.values() if st.overlap_s > 0]
        per_row = [
            st.expert_time_s / st.rows_computed if st.rows_computed else 0.0
            for st in stats.values()
        ]
        t = torch.tensor(
            [min(overlap) if overlap else 0.0, *per_row],
            dtype=torch.float64,
            device=backend_device(),
        )
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.cpu()
        for rt, row_s in zip(self.runtimes.values(), t[1:].tolist()):
            if row_s > 0:
                rt.time_per_row_s = row_s
        return t[0].item()

    def _measure_bandwidth(self) -> float:
        """Bytes/s of a synchronous sparse all-gather (each expert of the largest bank to the
        next rank), the slowest rank's figure.

        [Note: why bandwidth is measured once, synchronously]
        The prefetched transfer's issue-to-completion time includes the dense work it hides
        behind whenever the transfer cannot progress during compute (gloo on busy cores): a
        bandwidth derived from it shrinks the overlap degree, which shrinks the next transfer,
        and the planner collapses to no replicas. A synchronous transfer measures the link.
        """
        if self.world == 1:
            return 1e9
        rt = max(self.runtimes.values(), key=lambda r: r.shard.layout.row_bytes())
        own = rt.shard.ownership
        target = own.with_replicas(
            {e: [(own.owner[e] + 1) % self.world] for e in range(own.num_experts)}
        )
        dist.barrier(group=self.sparse_group)
        t0 = time.perf_counter()
        _, st = sparse_all_gather(
            rt.shard.rows_OS,
            own,
            target,
            self.sparse_group,
            algorithm=self.cfg.collective_algorithm,
            phase="bandwidth probe",
            timeout_s=self.cfg.timeout_s,
        )
        elapsed = time.perf_counter() - t0
        bw = torch.tensor(
            [st.bytes_recv / max(elapsed, 1e-9)], dtype=torch.float64, device=backend_device()
        )
        dist.all_reduce(bw, op=dist.ReduceOp.MIN)
        return max(float(bw.item()), 1.0)

    def _degree(self, rt: BankRuntime, overlap_s: float, bandwidth: float) -> int:
        if self.cfg.overlap_degree >= 0:
            return self.cfg.overlap_degree
        if overlap_s <= 0:  # nothing measured yet: as many as memory allows
            return self.cfg.memory_cap
        return overlap_degree(
            overlap_s, bandwidth, rt.shard.layout.row_bytes(), rt.shard.layout.num_experts
        )

    def _reshard(self, overlap_s: float, bandwidth: float) -> None:
        loads = {n: est.estimate() for n, est in self.estimators.items()}
        aside = {n: self._degree(rt, overlap_s, bandwidth) for n, rt in self.runtimes.items()}
        owners = heterogeneous_sharding(loads, self.topology, aside)
        self.store.reshard(owners)
        self._last["resharded"] = True

    # -- accounting --------------------------------------------------------------------------
    def set_phase_timer(self, timer: PhaseTimer) -> None:
        super().set_phase_timer(timer)
        self._phases = timer
        for rt in self.runtimes.values():
            rt.phases = timer

    def expert_bytes(self) -> dict[str, int]:
        return {n: rt.shard.layout.row_bytes() for n, rt in self.runtimes.items()}

    def comm_bytes(self) -> dict[str, int]:
        stats = self._last.get("stats", {})
        keys = ("spag", "sprs", "a2a")
        mine = [sum(st.bytes[k] for st in stats.values()) for k in keys]
        t = torch.tensor(mine, dtype=torch.float64, device=backend_device())
        if self.world > 1:
            dist.all_reduce(t)
        out = {k: int(v) for k, v in zip(keys, t.cpu().tolist())}
        # FSDP2 on the dense parameters: all-gather forward and backward, reduce-scatter.
        out["dense"] = 3 * (self.world - 1) * self._dense_param_bytes
        return out

    def expert_time_s(self) -> float | None:
        stats = self._last.get("stats", {})
        return sum(st.expert_time_s for st in stats.values())

    def rows_computed(self) -> int:
        """Rows this rank's expert compute processed in the last step (all banks)."""
        return sum(st.rows_computed for st in self._last.get("stats", {}).values())

    def placements(self) -> dict[str, list[int]] | None:
        """Replicas per expert of the placement each bank ran with in the finished step (logged;
        in exact mode it is planned inside the step, so the next step's plan would not show it)."""
        stats = self._last.get("stats", {})
        out = {}
        for name, rt in self.runtimes.items():
            st = stats.get(name)
            used = st.placement if st is not None and st.placement is not None else None
            out[name] = (used or rt.shard.ownership).num_replicas()
        return out

    def state_bytes(self, opt: torch.optim.Optimizer) -> int:
        return super().state_bytes(opt) + self.store.state_bytes()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        # The store's experts already use the shared layout (fssdp/strategies/state.py).
        return layout_state_dict(self.model, opt, self.store.state_dict())

    def load_state_dict(self, sd: dict[str, Any], opt: torch.optim.Optimizer) -> None:
        load_layout(self.model, opt, sd)
        self.store.load_state_dict(sd["experts"])

    # -- tests and tools ---------------------------------------------------------------------
    def full_grads(self) -> dict[str, Tensor]:
        """Every gradient as a full tensor named like the unsharded model's parameters."""
        out = {}
        for name, p in self.model.named_parameters():
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):
                g = g.full_tensor()
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = torch.zeros_like(full) if g is None else g.detach().clone()
        for bank_name, rt in self.runtimes.items():
            s = rt.shard
            full_ES = torch.zeros(s.layout.num_experts, s.layout.numel, dtype=s.rows_OS.dtype)
            if s.grad_OS is not None:
                full_ES[torch.tensor(s.owned(self.rank), dtype=torch.long)] = s.grad_OS.cpu()
            if self.world > 1:
                dist.all_reduce(full_ES)
            for pname, view in s.layout.views(full_ES).items():
                out[f"{bank_name}.{pname}"] = view.clone()
        return {k: out[k] for k in sorted(out)}


def _prefetch(runtimes: list[BankRuntime]) -> None:
    for rt in runtimes:
        rt.prefetch()


class EPParallel(FSSDPParallel):
    """`parallel=ep`: static owners (contiguous blocks), tokens go to owners by all-to-all."""

    name = "ep"
    replicate = False

    def initial_owners(self, banks: dict[str, int]) -> dict[str, list[int]]:
        from fssdp.sharding import contiguous_sharding

        return {name: contiguous_sharding(n, self.world) for name, n in banks.items()}
