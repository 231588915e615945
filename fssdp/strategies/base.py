"""What every strategy hands the trainer: a model ready to train, and its local accounting.

[Note: the strategy interface]
A strategy is built by `fssdp.parallelize` (structure only: it may run on a meta-device model),
then the trainer calls:
- `materialize(device, seed)`: allocate what this rank holds and initialise it (world-size
  invariant: models/common/init.py), then finish wrappers that need values (DDP);
- `attach(opt)`: the optimizer exists; the strategy's end of step becomes its step post-hook;
- per step: `module(...)` forward, backward, `finish_backward()`, `clip_grad_norm_(max)`,
  `opt.step()` (runs `end_step()`), `opt.zero_grad()`; under gradient accumulation each
  micro-batch's forward and backward run inside `micro_batch(last)` and `finish_backward()`
  runs once, after the last ([Note: sync per step]); a no-grad statistics pre-pass over the
  step's micro-batches runs inside `statistics_pass()`;
- `local_metrics()`: this rank's figures of the finished step, no collective (the trainer
  gathers every rank's at once);
- `checkpoint`: the state-dict adapter of the shared layout (fssdp/checkpoint.py).
Nothing here hides a collective behind a getter: `clip_grad_norm_`, `finish_backward` and
`end_step` are the methods that communicate, and say so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from collectives.comm import backend_device
from collectives.placement import Topology
from fssdp.checkpoint import ExpertStateDict
from fssdp.config import ParallelConfig
from fssdp.dense import local_slices, set_dense_sync
from fssdp.phases import NULL_TIMER, PhaseTimer, time_backward_chain
from models.common.experts import ExpertBank


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(t: Tensor) -> int:
    return _local(t).numel() * t.element_size()


@dataclass
class LocalMetrics:
    """This rank's figures of the finished step; the trainer gathers every rank's once."""

    comm_bytes: dict[str, float] = field(default_factory=dict)  # sent by this rank, by kind
    expert_time_s: float = 0.0  # expert compute (forward), all banks
    rows_computed: int = 0  # rows this rank's expert compute processed (ep, fssdp)
    state_bytes: int = 0  # parameters + gradients + optimizer state + replica capacity
    # Replicas per expert per bank of the placement the step ran with (identical on every
    # rank, so not gathered); None for strategies that never replicate.
    replicas: dict[str, list[int]] | None = None


class LocalTimer:
    """Executor that runs a bank locally and adds up its compute time per step."""

    def __init__(self) -> None:
        self.step_s = 0.0
        self.last_s = 0.0
        self.phases: PhaseTimer = NULL_TIMER

    def __call__(self, bank: ExpertBank, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        if self.phases.active and x_ND.requires_grad:
            # A view of its own, so that its gradient hook fires when this call's backward is
            # done, not when every user of x_ND is (a view's backward is the identity).
            x_ND = x_ND.view_as(x_ND)
        tok = self.phases.begin("expert")
        t0 = time.perf_counter()
        y = bank.compute(bank.stacked(), x_ND, expert_N)
        self.step_s += time.perf_counter() - t0
        self.phases.end(tok)
        time_backward_chain(self.phases, [y, x_ND], ["expert"])
        return y

    def end_step(self) -> None:
        self.last_s, self.step_s = self.step_s, 0.0


class Parallelized:
    """A model prepared for one strategy ([Note: the strategy interface]). This base runs
    everything on one process (`parallel=none`); subclasses override the parts they change."""

    name: ClassVar[str] = "none"
    # Whether the strategy runs bf16 mixed precision itself (FSDP2's MixedPrecisionPolicy and
    # the experts' casts, fssdp/precision.py); else the trainer autocasts under bfloat16.
    mixed_precision: bool = False

    def __init__(self, model: nn.Module, cfg: ParallelConfig, topology: Topology) -> None:
        # The unwrapped model: its FQNs name parameters in checkpoints and metrics.
        self.model = model
        # What the forward calls (a DDP wrapper, or the model itself).
        self.module: nn.Module = model
        self.cfg, self.topology = cfg, topology
        self.world = topology.world_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # The dtype experts compute in when the strategy runs mixed precision itself (set by
        # those that do, from fssdp/precision.py), else None.
        self.compute_dtype: torch.dtype | None = None
        self.banks = {m.bank_name: m for m in model.modules() if isinstance(m, ExpertBank)}
        # Banks that run here with their own weights get a timing executor, so every strategy
        # reports expert compute time (and with it the straggler ratio).
        self._timer = LocalTimer()
        for bank in self.banks.values():
            if bank.executor is None:
                bank.executor = self._timer
        fqns = [
            f"{b}.{n}" for b, m in self.banks.items() for n, _ in m.named_parameters(recurse=False)
        ]
        self.checkpoint = ExpertStateDict(model, fqns, self.expert_rows)
        self.opt: torch.optim.Optimizer | None = None
        self._last: LocalMetrics | None = None  # the finished step's figures
        self.phases: PhaseTimer = NULL_TIMER  # the trainer's phase timer, once instrumented

    # -- lifecycle ----------------------------------------------------------------------------
    def materialize(self, device: torch.device, seed: int | None, *, finish: bool = True) -> None:
        """Allocate what this rank holds (a meta-device build) and initialise it from `seed`.

        seed None: keep the values of an already materialised model, or, on meta, allocate
        without initialising (memory estimates: launch/estimate.py). finish False skips the
        wrappers and measurements that communicate (DDP, the bandwidth probe).
        """
        if any(p.is_meta for p in self.model.parameters()):
            self.model.to_empty(device=device)
        else:
            self.model.to(device)
        if seed is not None:
            from models.common.init import init_weights

            init_weights(self.model, seed, write=self.write_full, expert_rows=self.init_rows)
        if finish:
            self._after_materialize()

    def _after_materialize(self) -> None:
        """Wrappers that need values (DDP), buffers, measurements."""

    def attach(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        opt.register_step_post_hook(lambda *_: self.end_step())

    def named_optimizer_params(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters the trainer's optimizer steps (experts included, under their FQNs)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # -- init hooks (models/common/init.py) ---------------------------------------------------
    @torch.no_grad()
    def write_full(self, dst: Tensor, full: Tensor) -> None:
        """Copy the part of a full-size CPU tensor that this rank holds into `dst`."""
        if isinstance(dst, DTensor):
            dst.to_local().copy_(full[local_slices(dst)])
        else:
            dst.copy_(full)

    def init_rows(self, bank: ExpertBank) -> tuple[dict[str, Tensor], Sequence[int]]:
        rows = {n: self.local_rows(p) for n, p in bank.named_parameters(recurse=False)}
        return rows, self.expert_ids(bank)

    def expert_rows(self, fqn: str, t: Tensor) -> tuple[Tensor, Sequence[int]]:
        """The rows of a stacked bank tensor (parameter or per-row state) this rank holds, and
        their global expert ids (the checkpoint adapter's view)."""
        return self.local_rows(t), self.expert_ids(self.banks[fqn.rsplit(".", 1)[0]])

    def local_rows(self, t: Tensor) -> Tensor:
        return _local(t)

    def expert_ids(self, bank: ExpertBank) -> Sequence[int]:
        """Global ids of the rows this rank holds of `bank`'s stacked parameters."""
        return bank.expert_ids if bank.expert_ids is not None else range(bank.num_experts)

    # -- the step -----------------------------------------------------------------------------
    # [Note: sync per step]
    # Gradient accumulation synchronises once per optimizer step, never per micro-batch: DDP's
    # all-reduce, FSDP2's reduce-scatter and FSSDP's spRS run in the last micro-batch's
    # backward only. For the others, `micro_batch(last=False)` says "accumulate, don't sync":
    # DDP runs under `no_sync()`, FSDP2 gets `set_requires_gradient_sync(False)` (it keeps
    # unsharded gradients until the last backward), and the FSSDP replicas stay held across
    # the step's micro-batches (one placement per step, their `.grad` accumulating; the leaf's
    # post-accumulate hook starts the spRS only in the last backward). Owned expert rows (ep,
    # fssdp) accumulate in their `.grad` like any parameter. `finish_backward()` then runs
    # once, after the last backward; it divides by W once.
    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """One micro-batch's forward and backward; `last=False`: accumulate, don't sync."""
        self._set_sync(last)
        try:
            yield
        finally:
            self._set_sync(True)

    def _set_sync(self, sync: bool) -> None:
        set_dense_sync(self.model, sync)

    @contextmanager
    def statistics_pass(self) -> Iterator[None]:
        """The no-grad pre-pass of an accumulated step ([Note: accumulation statistics] in
        models/common/context.py): a strategy whose banks keep per-step state counts nothing
        of it toward the step (fssdp records the step's counts for its plan instead)."""
        yield

    def finish_backward(self) -> None:
        """Complete gradient synchronisation that backward left in flight (collectives)."""

    def sharded_params(self) -> list[Tensor]:
        """Plain (non-DTensor) parameters whose rows differ per rank: their gradient norm is
        summed over ranks in `clip_grad_norm_`."""
        return []

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip every gradient to a global norm of max_norm; return the norm (collective)."""
        sharded = {id(p) for p in self.sharded_params()}
        params = [p for _, p in self.named_optimizer_params()]
        dense = [p.grad for p in params if p.grad is not None and id(p) not in sharded]
        own = [p.grad for p in params if p.grad is not None and id(p) in sharded]
        sq = torch.zeros((), dtype=torch.float64)
        if dense:
            norm = torch.nn.utils.get_total_norm(dense)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            sq += float(norm) ** 2
        if sharded:
            mine = sum((g.double().pow(2).sum() for g in own), torch.zeros((), dtype=torch.float64))
            mine = mine.to(backend_device())
            if self.world > 1:
                dist.all_reduce(mine)
            sq += float(mine)
        total = sq.sqrt()
        for group in ([p for p in params if id(p) not in sharded], self.sharded_params()):
            if group:  # apart: foreach kernels refuse a mix of DTensors and plain tensors
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    def end_step(self) -> None:
        """After the optimizer step (its post-hook): close the step's counters."""
        self._last = self.collect_step()

    def collect_step(self) -> LocalMetrics:
        """This step's figures; resets the per-step counters."""
        self._timer.end_step()
        return LocalMetrics(
            comm_bytes={"spag": 0, "sprs": 0, "a2a": 0, "dense": 0},
            expert_time_s=self._timer.last_s,
        )

    # -- accounting ---------------------------------------------------------------------------
    def instrument(self, timer: PhaseTimer) -> None:
        """Record phase spans (fssdp/phases.py) into `timer`: the banks' executors report to it."""
        self.phases = timer
        self._timer.phases = timer

    def local_metrics(self) -> LocalMetrics:
        """The finished step's figures on this rank (no collective)."""
        last = self._last if self._last is not None else LocalMetrics()
        last.state_bytes = self.state_bytes()
        return last

    def state_bytes(self) -> int:
        """Bytes of parameters + gradients + optimizer state this rank holds (+ replicas)."""
        total = sum(2 * _bytes(p) for _, p in self.named_optimizer_params())
        if self.opt is not None:
            for st in self.opt.state.values():
                total += sum(_bytes(v) for v in st.values() if isinstance(v, Tensor) and v.ndim)
        return total

    def expert_bytes(self) -> dict[str, int]:
        """Bytes of one expert of each bank (its parameters), by bank name."""
        return {
            name: sum(_prod(p.shape[1:]) * p.element_size() for p in b.parameters(recurse=False))
            for name, b in self.banks.items()
        }

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "world": self.world}


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
