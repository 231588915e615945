"""SUT: halted tokens leave the expert banks, ACT loss = expected depth, MI loss ranking,
causality, exact cached decoding with halting, learning (world-size invariance: tests/dist)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import losses
from models.common.context import BatchReducer, MoEContext
from models.common.experts import ExpertBank
from models.registry import build_model, preset
from tests.support.causality import assert_causal
from tests.support.simulated_ranks import global_loss as _loss

D = 64  # tiny d_model


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny shapes run fastest single-threaded, and the CI machine's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(dtype: torch.dtype = torch.float64, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(preset("sut_tiny", **overrides)).to(dtype)
    with torch.no_grad():  # zero at init: make the relative position logits matter in tests
        model.layer.attn.rel_pos.normal_(std=0.5)
    return model


def tokens(B: int, S: int, seed: int = 1) -> Tensor:
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def constant_halting(model: nn.Module, alpha: float) -> None:
    """Make the halting gate give α for every token and step: hidden = GELU(1) everywhere."""
    g = model.halt
    with torch.no_grad():
        g.hidden.weight.zero_()
        g.hidden.bias.fill_(1.0)
        g.out.weight.zero_()
        gelu1 = F.gelu(torch.tensor(1.0, dtype=torch.float64)).item()
        g.out.weight[1].fill_(math.log(alpha / (1 - alpha)) / (D * gelu1))


def mixed_halting(model: nn.Module) -> None:
    """A halting gate that varies strongly per token, so tokens halt at different steps."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.halt.hidden.weight.copy_(torch.randn(D, D, generator=gen) / math.sqrt(D))
        model.halt.hidden.bias.zero_()
        model.halt.out.weight.zero_()
        w_D = torch.randn(D, generator=gen)
        model.halt.out.weight[1] = 2 * (w_D - w_D.mean())  # no token-shared component


def record_rows(model: nn.Module) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = defaultdict(list)

    def rec(bank: ExpertBank, x_ND: Tensor, e_N: Tensor) -> Tensor:
        rows[bank.bank_name].append(x_ND.shape[0])
        return bank.compute(bank.stacked(), x_ND, e_N)

    for m in model.modules():
        if isinstance(m, ExpertBank):
            m.executor = rec
    return rows


def test_halted_tokens_leave_the_banks() -> None:
    T, K = 2 * 10, 2
    model = tiny()
    rows = record_rows(model)
    with torch.no_grad():
        model(tokens(2, 10))  # α = 1/2 at init: nobody halts within 4 steps
        assert rows == {
            n: [T * K] * 4 for n in ("layer.attn.q", "layer.attn.o", "layer.moe.experts")
        }
        # α = 0.95: remaining mass 0.05, 0.0025, 1.25e-4 < 1e-3 → all frozen after step 3,
        # yet the banks are still called (with no rows), so every rank makes the same calls.
        rows.clear()
        constant_halting(model, 0.95)
        model(tokens(2, 10))
        assert rows == {n: [T * K] * 3 + [0] for n in rows} and len(rows) == 3
        # per-token halting: later steps see fewer rows, but not none
        rows.clear()
        mixed_halting(model)
        model(tokens(2, 10))
    ffn = rows["layer.moe.experts"]
    assert rows["layer.attn.q"] == rows["layer.attn.o"] == ffn
    assert ffn[0] == T * K and all(a >= b for a, b in zip(ffn, ffn[1:]))
    assert 0 < ffn[-1] < ffn[1] < T * K, ffn


def _expected_depth(alpha: float, steps: int, tau: float = 0.999) -> float:
    """Stick-breaking by hand: p_n = α·(1−α)^(n−1); a frozen token (or the last step) takes all
    of the remaining mass; steps counted from 0, as the reference (Σ_n (n − 1)·p_n)."""
    depth, rem = 0.0, 1.0
    for n in range(1, steps + 1):
        if n == steps or rem * (1 - alpha) < 1 - tau:
            return depth + (n - 1) * rem
        depth += (n - 1) * rem * alpha
        rem *= 1 - alpha
    raise AssertionError


@pytest.mark.parametrize("alpha", [0.5, 0.95, 0.3])
def test_act_loss_is_expected_depth(alpha: float) -> None:
    model = tiny(aux_act=1.0, aux_mi=0.0)
    constant_halting(model, alpha)
    ctx = MoEContext()
    model(tokens(2, 7), ctx)
    assert set(ctx.aux_losses) == {"act"}
    want = _expected_depth(alpha, 4)
    # α = 0.95: 0·0.95 + 1·0.0475 + 2·(0.002375 + the leftover 0.000125) = 0.0525
    assert want == pytest.approx({0.5: 0.875, 0.95: 0.0525, 0.3: 1.533}[alpha], abs=1e-12)
    assert ctx.aux_losses["act"].item() == pytest.approx(want, rel=1e-12)


Step = tuple[list[int], dict[int, float], dict[int, float]]


def _replay(
    gate_out: list[tuple[Tensor, Tensor]], T: int, N: int, tau: float = 0.999
) -> list[Step]:
    """Stick-breaking by hand from the α the gate gave each active token. Per step n: the active
    tokens, their remaining mass entering n, and their p_n (a freezing token's leftover mass and
    the last step's remaining mass included)."""
    rem, active, steps = [1.0] * T, list(range(T)), []
    for n in range(1, N + 1):
        entering, p, running = {t: rem[t] for t in active}, {}, []
        for i, t in enumerate(active):
            if n == N:
                p[t] = rem[t]
                continue
            a = gate_out[n - 1][0][i].exp().item()
            p[t], rem[t] = rem[t] * a, rem[t] * (1 - a)
            if rem[t] < 1 - tau:
                p[t] += rem[t]  # frozen: the leftover mass stays at this step
            else:
                running.append(t)
        steps.append((active, entering, p))
        active = running
    return steps


def test_act_loss_with_per_token_halting() -> None:
    """ACT loss = mean over tokens of Σ_n (n − 1)·p_n, replayed by hand."""
    model = tiny(aux_act=1.0, aux_mi=0.0)
    mixed_halting(model)
    gate_out: list[tuple[Tensor, Tensor]] = []
    model.halt.forward = _recorder(model.halt.forward, gate_out)
    ctx = MoEContext()
    model(tokens(2, 10), ctx)
    T, N = 20, 4
    assert len(gate_out) == N - 1  # no gate at the last step: it takes all remaining mass
    steps = _replay(gate_out, T, N)
    for (active, _, _), (log_a, _) in zip(steps, gate_out):
        assert len(log_a) == len(active)  # the gate only sees the tokens still running
    assert 0 < len(steps[-1][0]) < T
    depth = sum((n - 1) * p for n, (_, _, ps) in enumerate(steps, 1) for p in ps.values())
    assert ctx.aux_losses["act"].item() == pytest.approx(depth / T, rel=1e-12)


def test_mi_loss_ranks_balanced_confident_routing_lowest() -> None:
    T, E = 64, 4
    r = BatchReducer()
    balanced = 20.0 * F.one_hot(torch.arange(T) % E, E).double()  # confident, all experts used
    uniform = torch.zeros(T, E, dtype=torch.float64)  # not confident
    collapsed = 20.0 * F.one_hot(torch.zeros(T, dtype=torch.long), E).double()  # one expert
    cases = dict(balanced=balanced, uniform=uniform, collapsed=collapsed)
    mi = {k: losses.mutual_information_loss(v, r).item() for k, v in cases.items()}
    assert mi["balanced"] < mi["uniform"] - 1 and mi["balanced"] < mi["collapsed"] - 1
    assert mi["balanced"] == pytest.approx(-math.log(E), abs=1e-6)
    # The reference code's sign slip rewards collapse instead.
    ref = losses.mutual_information_loss(collapsed, r, reference_sign=True)
    assert ref < losses.mutual_information_loss(balanced, r, reference_sign=True)


@pytest.mark.parametrize("weights", ["remaining_mass", "uniform"])
@pytest.mark.parametrize("reference_sign", [False, True])
def test_model_mi_loss_uses_active_rows_of_all_steps(reference_sign: bool, weights: str) -> None:
    """MI over the active rows of every step, each weighted (reference) by its token's remaining
    halting mass entering the step, replayed by hand; or uniformly."""
    model = tiny(aux_mi=0.5, aux_act=0.0, mi_reference_sign=reference_sign, mi_weights=weights)
    mixed_halting(model)
    seen: dict[str, list[Tensor]] = defaultdict(list)
    for name, router in (("att", model.layer.attn.router), ("ffn", model.layer.moe.router)):
        router.logits = _recorder(router.logits, seen[name])
    gate_out: list[tuple[Tensor, Tensor]] = []
    model.halt.forward = _recorder(model.halt.forward, gate_out)
    ctx = MoEContext()
    model(tokens(2, 10), ctx)
    assert [len(l) for l in seen["ffn"]][0] == 20 and len(seen["ffn"]) == 4
    assert sum(len(l) for l in seen["ffn"]) < 80  # some tokens halted early
    steps = _replay(gate_out, 20, 4)
    rem = [m[t] for active, m, _ in steps for t in active]
    assert rem[0] == 1.0 and min(rem) < 0.1  # later rows carry less weight
    w_N = torch.tensor(rem, dtype=torch.float64) if weights == "remaining_mass" else None
    for name in ("att", "ffn"):
        logits = torch.cat(seen[name])
        mi = losses.mutual_information_loss(logits, BatchReducer(), reference_sign, w_N)
        torch.testing.assert_close(ctx.aux_losses[f"mi_{name}"], 0.5 * mi, rtol=1e-12, atol=0)
        if weights == "remaining_mass":  # the weights matter on this batch
            plain = losses.mutual_information_loss(logits, BatchReducer(), reference_sign)
            assert abs(plain - mi) > 1e-6


@pytest.mark.parametrize("kv_source", ["soft_halted", "state"])
def test_keys_and_values_come_from_the_soft_halted_state(kv_source: str) -> None:
    """The reference's K/V source, replayed by hand: step n attends over LN of each token's
    s_{n−1}, s_0 = the embedding, s_n = Σ_{j<n} p_j·h_j + (mass entering n)·h_n while active (at
    step 3: α₁·h₁ + (1 − α₁)·h₂), a frozen token keeping its final output. `state`: LN(h_{n−1})."""
    model = tiny(kv_source=kv_source)
    mixed_halting(model)
    gate_out: list[tuple[Tensor, Tensor]] = []
    model.halt.forward = _recorder(model.halt.forward, gate_out)
    layer_out: list[tuple[Tensor, ...]] = []
    model.layer.forward = _recorder(model.layer.forward, layer_out)
    x = tokens(2, 10)
    cache = model.new_cache()
    with torch.no_grad():
        model(x, cache=cache)
        h = [(model.embedding(x) * math.sqrt(D)).reshape(20, D), *(o[0] for o in layer_out)]
        steps = _replay(gate_out, 20, 4)
        soft, acc = [h[0]], torch.zeros_like(h[0])
        for n, (active, entering, p) in enumerate(steps, 1):
            s_n = soft[-1].clone()
            for t in active:
                s_n[t] = acc[t] + entering[t] * h[n][t]
                acc[t] += p[t] * h[n][t]
            soft.append(s_n)
        frozen = [t for t in range(20) if t not in steps[2][0]]
        a1 = [gate_out[0][0][t].exp().item() for t in range(20)]
        for t in steps[2][0]:  # active at step 3: α₁·h₁ + (1 − α₁)·h₂
            assert rel_err(soft[2][t], a1[t] * h[1][t] + (1 - a1[t]) * h[2][t]) <= 1e-12
        assert frozen and steps[2][0]  # step 3 has frozen and active tokens
        assert rel_err(soft[4][frozen], acc[frozen]) <= 1e-12  # frozen: their final output
        for n in range(1, 5):
            src = soft[n - 1] if kv_source == "soft_halted" else h[n - 1]
            k_want = model.layer.attn.kv(model.layer.ln1(src)).view(2, 10, 2, 2, 16)
            k_want = k_want[:, :, 0].transpose(1, 2)
            assert rel_err(cache[n - 1].k, k_want) <= 1e-12, n
        assert rel_err(soft[2], h[2]) > 1e-3  # from step 3 on the two sources differ


def _recorder(fn: Callable[..., Any], seen: list) -> Callable[..., Any]:
    """Wrap a bound method so that each call's result is also appended to `seen`."""

    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        seen.append(out)
        return out

    return wrapped


@pytest.mark.parametrize("halting", ["none", "mixed"])
def test_causality(halting: str) -> None:
    model = tiny()
    if halting == "mixed":
        mixed_halting(model)
    assert_causal(model, tokens(2, 10), 6)


@pytest.mark.parametrize("kv_source", ["soft_halted", "state"])
@pytest.mark.parametrize("halting", ["none", "mixed", "all_early"])
def test_cached_decoding_matches_full_forward(halting: str, kv_source: str) -> None:
    model = tiny(kv_source=kv_source)
    if halting == "mixed":
        mixed_halting(model)
    elif halting == "all_early":
        constant_halting(model, 0.95)
    x = tokens(2, 12)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        steps = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(12)], dim=1)
        cache = model.new_cache()
        chunks = torch.cat([model(x[:, :5], cache=cache), model(x[:, 5:], cache=cache)], dim=1)
    assert len(cache) == 4 and all(c.length == 12 for c in cache)
    assert rel_err(steps, full) <= 1e-9
    assert rel_err(chunks, full) <= 1e-9


def test_relative_positions_are_clipped() -> None:
    """Beyond ±max_rel_pos all offsets share one embedding: only offsets −M..0 get gradient."""
    model = tiny(max_rel_pos=3)
    model(tokens(1, 12)).sum().backward()
    g = model.layer.attn.rel_pos.grad  # [heads, dh, 2M+1], offset o at index o + M
    assert g.shape == (2, 16, 7)
    assert g[..., :4].abs().amax(dim=(0, 1)).min() > 0 and g[..., 4:].abs().max() == 0










def test_learns_repeating_sequence() -> None:
    model = tiny(torch.float32)
    x = tokens(4, 8, seed=5).repeat(1, 3)  # the same 8 tokens three times
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = _loss(model, x, BatchReducer())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first, (first, loss.item())
