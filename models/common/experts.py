"""The expert bank: the one seam between models and the runtime.

`ExpertBank.forward(x_ND, expert_N) -> y_NO` applies expert `expert_N[i]` to row `x_ND[i]`.
Weights are stacked on dim 0 so that one expert is one index; the bank never knows where it runs:
an *executor* attached by `fssdp.parallelize` decides (local, EP, FSSDP). Without one, the bank
computes locally with its own weights.

Legend: N rows sent to the bank, D input width, H hidden width (of an expert's MLP), O output
width, E experts, n rows of one expert. `w` (lower case, not a dimension) is a dict of weights:
name -> [E, ...] stacked, or one expert's slice (W is ranks in the legends of fssdp/ and
collectives/).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common.layers import reset_unless_meta

# An executor receives the bank and the call's arguments and returns y_NO. It must produce the
# same values and gradients as `bank.compute(bank.stacked(), x_ND, expert_N)`.
BankExecutor = Callable[["ExpertBank", Tensor, Tensor], Tensor]


class ExpertBank(nn.Module):
    """Base class: subclasses register stacked parameters and define `expert_forward` and
    `init_expert`.

    The stacked parameters hold the rows of `expert_ids` (all E experts when None). The runtime
    builds the model on the meta device, then keeps only the rows of the experts a rank owns
    ([Note: init protocol] in models/common/layers.py); `num_experts` stays the global E.
    """

    # Global ids of the rows this module's stacked parameters hold (None: all E, in order); set
    # by the runtime when it shards the bank.
    expert_ids: tuple[int, ...] | None = None

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        # Set by the runtime (fssdp.parallelize); None means "run here with my own weights".
        self.executor: BankExecutor | None = None
        # Set by the runtime where an early routing helps (fssdp/counts.py); None: nothing to do.
        self.announcer: Callable[[Tensor], None] | None = None
        # Global name of the bank (its qualified module name), set by `name_banks`; keys
        # placement, metrics and checkpoints.
        self.bank_name: str = ""

    # -- what a subclass provides -------------------------------------------------------------
    def expert_forward(self, w: dict[str, Tensor], x_nD: Tensor) -> Tensor:
        """Apply one expert whose weights are `w[name]` (the expert's slice, no E dim)."""
        raise NotImplementedError

    def init_expert(self, w: dict[str, Tensor]) -> None:
        """Initialise one expert in place; `w[name]` is that expert's slice (no E dim).

        Draws from the global RNG: `init_weights` seeds it per (seed, bank, expert id).
        """
        raise NotImplementedError

    # -- the shared machinery -----------------------------------------------------------------
    def stacked(self) -> dict[str, Tensor]:
        """This bank's stacked expert weights, name -> [len(expert_ids) or E, ...]."""
        return dict(self.named_parameters(recurse=False))

    def reset_parameters(self) -> None:
        """`init_expert` on every row this module holds, in row order, from the global RNG."""
        with torch.no_grad():
            w = self.stacked()
            for i in range(next(iter(w.values())).shape[0]):
                self.init_expert({k: v[i] for k, v in w.items()})

    def compute(self, w: dict[str, Tensor], x_ND: Tensor, expert_N: Tensor) -> Tensor:
        """Dropless grouped compute with stacked weights `w` (leading dim = #experts in `w`).

        Rows are sorted by expert, each expert's contiguous group runs one matmul chain, and the
        results are scattered back to the original row order. Experts with no rows are skipped
        (their weights then get no gradient).
        """
        return self.compute_parts((w,), x_ND, expert_N)

    def compute_parts(
        self, parts: Sequence[dict[str, Tensor]], x_ND: Tensor, expert_N: Tensor
    ) -> Tensor:
        """`compute` over several weight stacks laid end to end: expert i of parts[1] is id
        len(parts[0]) + i, and so on (an owner's parameters, then the replicas it received).
        One sort of the rows, no concatenated copy of the weights on the per-expert path."""
        N = x_ND.shape[0]
        if N == 0:
            return x_ND.new_zeros(0, self.out_features)
        n_exp = sum(next(iter(w.values())).shape[0] for w in parts)
        order_N = torch.argsort(expert_N, stable=True)
        counts = torch.bincount(expert_N, minlength=n_exp).tolist()
        x_sorted_ND = x_ND.index_select(0, order_N)
        fast = _grouped_mm_path(self, parts, x_sorted_ND, counts)
        if fast is not None:
            y_sorted_NO = fast
        else:
            # unbind, not w[e] per expert: one backward stacks all experts' gradients, where
            # each select's backward would zero-fill a full [E, ...] tensor.
            per_expert = {k: sum((w[k].unbind(0) for w in parts), ()) for k in parts[0]}
            outs = [
                self.expert_forward({k: v[e] for k, v in per_expert.items()}, x_nD)
                for e, x_nD in enumerate(x_sorted_ND.split(counts))
                if x_nD.shape[0] > 0
            ]
            y_sorted_NO = torch.cat(outs, dim=0)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(N, device=order_N.device)
        return y_sorted_NO.index_select(0, inverse_N)

    def forward(self, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        if self.executor is None:
            return self.compute(self.stacked(), x_ND, expert_N)
        return self.executor(self, x_ND, expert_N)

    def announce(self, expert_N: Tensor) -> None:
        """Tell the runtime the expert ids of this bank's next call, as soon as they are known
        (before other work the runtime may overlap, e.g. attention). The next call must use
        exactly these ids. A no-op when the bank runs here."""
        if self.announcer is not None:
            self.announcer(expert_N)

    def expert_numel(self) -> int:
        """Elements of one expert (all its parameters): the unit the runtime moves."""
        return sum(math.prod(p.shape[1:]) for p in self.parameters(recurse=False))


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLPExperts(ExpertBank):
    """Two-layer experts: act(x·w_in + b_in)·w_out + b_out, or SwiGLU when activation='swiglu'.

    Covers GPT-MoE/SUT (GELU, biases), MoEUT (ReLU, no biases), UMoE (SiLU, no gate) and Jamba
    (SwiGLU). `w_in [E, D, H]`, `w_gate [E, D, H]` (SwiGLU), `w_out [E, H, O]`, `b_in [E, H]`,
    `b_out [E, O]`.
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_hidden: int,
        d_out: int | None = None,
        activation: str = "gelu",
        bias: bool = True,
        std_in: float | None = None,
        std_out: float | None = None,
    ) -> None:
        d_out = d_in if d_out is None else d_out
        super().__init__(num_experts, d_in, d_out)
        if activation not in (*_ACTIVATIONS, "swiglu"):
            raise ValueError(f"unknown expert activation {activation!r}")
        self.activation = activation
        self.d_hidden = d_hidden
        E = num_experts
        self.w_in = nn.Parameter(torch.empty(E, d_in, d_hidden))
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(E, d_in, d_hidden))
        self.w_out = nn.Parameter(torch.empty(E, d_hidden, d_out))
        if bias:
            self.b_in = nn.Parameter(torch.empty(E, d_hidden))
            self.b_out = nn.Parameter(torch.empty(E, d_out))
        self.std_in = std_in if std_in is not None else 1.0 / math.sqrt(d_in)
        self.std_out = std_out if std_out is not None else 1.0 / math.sqrt(d_hidden)
        reset_unless_meta(self)

    def init_expert(self, w: dict[str, Tensor]) -> None:
        """w_in, w_gate ~ N(0, std_in²), w_out ~ N(0, std_out²), biases zero."""
        w["w_in"].normal_(0.0, self.std_in)
        if "w_gate" in w:
            w["w_gate"].normal_(0.0, self.std_in)
        w["w_out"].normal_(0.0, self.std_out)
        for name in ("b_in", "b_out"):
            if name in w:
                w[name].zero_()

    def expert_forward(self, w: dict[str, Tensor], x_nD: Tensor) -> Tensor:
        h_nH = x_nD @ w["w_in"]
        if "b_in" in w:
            h_nH = h_nH + w["b_in"]
        if self.activation == "swiglu":
            h_nH = F.silu(x_nD @ w["w_gate"]) * h_nH
        else:
            h_nH = _ACTIVATIONS[self.activation](h_nH)
        y_nO = h_nH @ w["w_out"]
        if "b_out" in w:
            y_nO = y_nO + w["b_out"]
        return y_nO


class LinearExperts(ExpertBank):
    """One projection per expert: x·weight (+ bias). `weight [E, D, O]`, `bias [E, O]`.

    Used for per-expert attention projections (SwitchHead V/O, SUT's MoA query/output).
    """

    def __init__(
        self, num_experts: int, d_in: int, d_out: int, bias: bool = False, std: float | None = None
    ) -> None:
        super().__init__(num_experts, d_in, d_out)
        self.weight = nn.Parameter(torch.empty(num_experts, d_in, d_out))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, d_out))
        self.std = std if std is not None else 1.0 / math.sqrt(d_in)
        reset_unless_meta(self)

    def init_expert(self, w: dict[str, Tensor]) -> None:
        """weight ~ N(0, std²), bias zero."""
        w["weight"].normal_(0.0, self.std)
        if "bias" in w:
            w["bias"].zero_()

    def expert_forward(self, w: dict[str, Tensor], x_nD: Tensor) -> Tensor:
        y_nO = x_nD @ w["weight"]
        return y_nO + w["bias"] if "bias" in w else y_nO


def _grouped_mm_path(
    bank: ExpertBank, parts: Sequence[dict[str, Tensor]], x_sorted_ND: Tensor, counts: list[int]
) -> Tensor | None:
    """bf16 grouped GEMM on CUDA via torch._grouped_mm, for bias-free MLP/linear experts
    (several weight stacks are concatenated first: one grouped GEMM needs one stack).

    Returns None when the fast path does not apply (CPU, other dtypes, biases, no op), and the
    caller then takes the per-expert loop, which computes the same function.
    """
    if not (x_sorted_ND.is_cuda and x_sorted_ND.dtype == torch.bfloat16):
        return None
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None or any(k.startswith("b") for k in parts[0]):
        return None
    w = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    offs = torch.tensor(counts, device=x_sorted_ND.device).cumsum(0).to(torch.int32)
    if isinstance(bank, LinearExperts):
        return grouped_mm(x_sorted_ND, w["weight"], offs=offs)
    if isinstance(bank, MLPExperts):
        h = grouped_mm(x_sorted_ND, w["w_in"], offs=offs)
        if bank.activation == "swiglu":
            h = F.silu(grouped_mm(x_sorted_ND, w["w_gate"], offs=offs)) * h
        else:
            h = _ACTIVATIONS[bank.activation](h)
        return grouped_mm(h, w["w_out"], offs=offs)
    return None


def name_banks(model: nn.Module) -> list[ExpertBank]:
    """Give every bank its qualified module name; return the banks in module order."""
    banks = []
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertBank):
            mod.bank_name = name
            banks.append(mod)
    return banks
