"""The expert bank computes exactly what a per-row loop computes, for every routing shape."""

from __future__ import annotations

import pytest
import torch

from models.common.experts import ExpertBank, LinearExperts, MLPExperts, name_banks


@pytest.fixture(autouse=True)
def _float64() -> object:
    """float64 for this module only (the default dtype is process-wide)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


BANKS = {
    "gelu_bias": lambda: MLPExperts(6, 8, 16, activation="gelu", bias=True),
    "relu_nobias": lambda: MLPExperts(6, 8, 12, activation="relu", bias=False),
    "swiglu": lambda: MLPExperts(6, 8, 12, d_out=5, activation="swiglu", bias=False),
    "linear": lambda: LinearExperts(6, 8, 5, bias=True),
}
ROUTINGS = {
    "random": lambda n: torch.randint(0, 6, (n,)),
    "all_to_one": lambda n: torch.full((n,), 4),
    "skewed_some_empty": lambda n: torch.tensor([0, 0, 0, 5, 0, 5, 0][:n] * (n // 7 + 1))[:n],
}


def per_row(bank: ExpertBank, x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
    w = bank.stacked()
    rows = [
        bank.expert_forward({k: v[e] for k, v in w.items()}, x_ND[i : i + 1])
        for i, e in enumerate(expert_N.tolist())
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("bank_name", BANKS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_grouped_equals_per_row(bank_name: str, routing: str) -> None:
    torch.manual_seed(0)
    bank = BANKS[bank_name]()
    x_ND = torch.randn(21, 8, requires_grad=True)
    expert_N = ROUTINGS[routing](21)
    y = bank(x_ND, expert_N)
    y_ref = per_row(bank, x_ND, expert_N)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x_ND, *bank.parameters()], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x_ND, *bank.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b)


def test_zero_rows() -> None:
    bank = BANKS["gelu_bias"]()
    y = bank(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 8)


def test_executor_hook_replaces_local_compute() -> None:
    bank = BANKS["linear"]()
    calls = []

    def executor(b: ExpertBank, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return 2 * b.compute(b.stacked(), x, e)

    x, e = torch.randn(5, 8), torch.randint(0, 6, (5,))
    plain = bank(x, e)
    bank.executor = executor
    torch.testing.assert_close(bank(x, e), 2 * plain)
    assert calls == [5]


def test_bank_names_and_expert_numel() -> None:
    model = torch.nn.ModuleDict({"a": BANKS["gelu_bias"](), "b": BANKS["swiglu"]()})
    banks = name_banks(model)
    assert [b.bank_name for b in banks] == ["a", "b"]
    assert banks[0].expert_numel() == 8 * 16 + 16 + 16 * 8 + 8
    assert banks[1].expert_numel() == 2 * 8 * 12 + 12 * 5


@pytest.mark.parametrize("bank_name", BANKS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("split", [0, 2, 6])
def test_parts_laid_end_to_end(bank_name: str, routing: str, split: int) -> None:
    """compute_parts over stacks [0, split) and [split, 6) is the per-row computation with the
    whole stack: values and the gradients of the rows and of both stacks (one of them empty
    when split is 0 or 6)."""
    torch.manual_seed(0)
    bank = BANKS[bank_name]()
    w = bank.stacked()
    head = {k: v[:split].detach().requires_grad_() for k, v in w.items()}
    tail = {k: v[split:].detach().requires_grad_() for k, v in w.items()}
    x_ND = torch.randn(21, 8, requires_grad=True)
    expert_N = ROUTINGS[routing](21)
    y = bank.compute_parts((head, tail), x_ND, expert_N)
    y_ref = per_row(bank, x_ND, expert_N)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    leaves = [*head.values(), *tail.values()]
    grads = torch.autograd.grad((y * g).sum(), [x_ND, *leaves], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x_ND, *w.values()])
    n = len(w)
    for i, (name, ref) in enumerate(zip(w, grads_ref[1:])):
        a, b = grads[1 + i], grads[1 + n + i]  # None: no row reached that stack
        a = torch.zeros_like(head[name]) if a is None else a
        b = torch.zeros_like(tail[name]) if b is None else b
        torch.testing.assert_close(torch.cat([a, b]), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-12, atol=1e-12)
