"""Standard layers with the zoo's initialisations; each initialises only its own parameters.

[Note: init protocol]
Every module initialises only its *own direct* parameters and buffers, in `reset_parameters()`
(the torch convention). A parent never reaches into a child: where a standard layer needs a
custom init, the child is one of the small subclasses below, built with what it needs. That is
what lets `models.common.init.init_weights` re-run each module's init on its own, on full-size
CPU shadows, under an RNG seeded by (seed, module name), after the runtime built the model on
the meta device and sharded it: values depend on neither world size nor construction order.
Constructors may call `reset_parameters()` when not on meta (`reset_unless_meta`), so eager
construction in unit tests still gives initialised modules; nothing else may init there.

Legend: N rows of an embedding table, D input / embedding width, O output width, R Δ rank,
I inner width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def direct_tensors(module: nn.Module) -> list[Tensor]:
    """The module's own parameters and buffers (not its children's)."""
    params = [p for p in module._parameters.values() if p is not None]
    return params + [b for b in module._buffers.values() if b is not None]


def reset_unless_meta(module: nn.Module) -> None:
    """Call `module.reset_parameters()` unless its own tensors live on the meta device."""
    if not any(t.is_meta for t in direct_tensors(module)):
        module.reset_parameters()  # type: ignore[operator]


class Linear(nn.Linear):
    """nn.Linear with weight ~ N(0, std²) and a zero bias.

    `std=None` keeps torch's default (Kaiming-uniform weight, uniform bias); `std=0` gives a zero
    weight.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = True, std: float | None = None) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(d_in, d_out, bias=bias)

    def reset_parameters(self) -> None:
        if self.std is None:
            super().reset_parameters()
            return
        with torch.no_grad():
            if self.std == 0:
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, self.std)
            if self.bias is not None:
                self.bias.zero_()


class Embedding(nn.Embedding):
    """nn.Embedding with weight ~ N(0, std²) (torch's default is std 1)."""

    def __init__(self, num: int, dim: int, std: float = 1.0) -> None:
        self.std = std
        super().__init__(num, dim)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.std)


class MambaDtProj(nn.Linear):
    """Mamba's Δ projection (mamba_ssm init): weight U(±R^-1/2); bias = softplus⁻¹(Δ₀) with
    Δ₀ log-uniform in [dt_min, dt_max] per inner channel (floored at 1e-4)."""

    def __init__(
        self, dt_rank: int, d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1
    ) -> None:
        self.dt_min, self.dt_max = dt_min, dt_max
        super().__init__(dt_rank, d_inner, bias=True)

    def reset_parameters(self) -> None:
        R, I = self.in_features, self.out_features
        with torch.no_grad():
            self.weight.uniform_(-(R**-0.5), R**-0.5)
            u_I = torch.rand(I, dtype=torch.float64)
            lo, hi = math.log(self.dt_min), math.log(self.dt_max)
            dt_I = torch.exp(u_I * (hi - lo) + lo).clamp_min(1e-4)
            self.bias.copy_(dt_I + torch.log(-torch.expm1(-dt_I)))  # softplus⁻¹(Δ₀)
