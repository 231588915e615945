"""What every strategy hands the trainer: a model ready to train, and its accounting."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from fssdp.phases import NULL_TIMER, PhaseTimer, time_backward_chain
from fssdp.strategies.state import layout_state_dict, load_layout
from models.common.experts import ExpertBank


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


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
    """A model prepared for one strategy. Subclasses override the parts they change.

    Per step the trainer calls `module(...)` (forward), `finish_backward()` after backward,
    `clip_grad_norm_()`, `optimizer_step(opt)`, then `opt.zero_grad()`.
    """

    name = "none"

    def __init__(self, model: nn.Module, module: nn.Module | None = None) -> None:
        # The unwrapped model: its FQNs name parameters in checkpoints and metrics.
        self.model = model
        # What the forward calls (a DDP wrapper, or the model itself).
        self.module = module if module is not None else model
        # Banks that run here with their own weights get a timing executor, so every strategy
        # reports expert compute time (and with it the straggler ratio).
        self._timer = LocalTimer()
        for mod in model.modules():
            if isinstance(mod, ExpertBank) and mod.executor is None:
                mod.executor = self._timer

    def named_optimizer_params(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters the trainer's (dense) optimizer steps."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def set_phase_timer(self, timer: PhaseTimer) -> None:
        """Record phase spans (fssdp/phases.py) into `timer`: the banks' executors report to it."""
        self._timer.phases = timer

    def expert_bytes(self) -> dict[str, int]:
        """Bytes of one expert of each bank (its parameters), by bank name."""
        return {
            m.bank_name: sum(
                p.numel() // max(1, p.shape[0]) * p.element_size()
                for p in m.parameters(recurse=False)
            )
            for m in self.model.modules()
            if isinstance(m, ExpertBank)
        }

    def finish_backward(self) -> None:
        """Complete gradient synchronisation that backward left in flight."""

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        params = [p for _, p in self.named_optimizer_params()]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        opt.step()
        self._timer.end_step()

    def comm_bytes(self) -> dict[str, int]:
        """Bytes sent this step, summed over ranks, by collective."""
        return {"spag": 0, "sprs": 0, "a2a": 0, "dense": 0}

    def expert_time_s(self) -> float | None:
        """Seconds this rank spent in expert compute (forward) in the last step."""
        return self._timer.last_s

    def placements(self) -> dict[str, list[int]] | None:
        """Replicas per expert of each bank (strategies that replicate experts)."""
        return None

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The shared layout ([Note: checkpoint layout] in fssdp/strategies/state.py)."""
        return layout_state_dict(self.model, opt)

    def load_state_dict(self, sd: dict[str, Any], opt: torch.optim.Optimizer) -> None:
        load_layout(self.model, opt, sd)

    def state_bytes(self, opt: torch.optim.Optimizer) -> int:
        """Bytes of parameters + gradients + optimizer state this rank holds."""
        total = 0
        for _, p in self.named_optimizer_params():
            total += 2 * _local(p).numel() * p.element_size()  # parameter + gradient buffer
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, Tensor) and v.ndim > 0:
                    total += _local(v).numel() * v.element_size()
        return total
