"""MoEUT: parameter counts, causality, cached decoding, layer reuse (R bank calls), the entropy
regulariser over all repeats, learning (world-size invariance: tests/dist)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from models.common.context import BatchReducer, MoEContext
from models.common.experts import ExpertBank
from models.moeut import _rows_keep_own_std_
from models.registry import build_model, preset
from tests.support.causality import assert_causal
from tests.support.simulated_ranks import global_loss as _loss


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny shapes run fastest single-threaded, and the CI machine's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(dtype: torch.dtype = torch.float64, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset("moeut_tiny", **overrides)).to(dtype)


def tokens(B: int, S: int, seed: int = 1) -> Tensor:
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "size,target", [("44m", 44e6), ("126m", 126e6), ("244m", 244e6), ("318m", 318e6)]
)
def test_published_param_counts(size: str, target: float) -> None:
    model = build_model(preset(f"moeut_{size}"), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - target) / target < 0.03, f"moeut_{size}: {n / 1e6:.2f}M"
    if size == "44m":  # the 44M config works out to about 44.2M
        assert abs(n - 44.2e6) / 44.2e6 < 0.01, n
        # V/O experts per head: [H·A, d, dh] and [H·A, dh, d]; σ-MoE experts [E, d, 128]
        assert model.layers[0].attention.v.weight.shape == (32, 412, 82)
        assert model.layers[0].attention.o.weight.shape == (32, 82, 412)
        assert model.layers[1].ffn.experts.w_in.shape == (155, 412, 128)
        assert len(model.layers) == 2 and model.n_repeats == 8


def test_causality() -> None:
    model = tiny()
    assert_causal(model, tokens(2, 10), 6)


@pytest.mark.parametrize("att_experts", [4, 1])
def test_cached_decoding_matches_full_forward(att_experts: int) -> None:
    model = tiny(att_experts=att_experts)
    x = tokens(2, 12)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        steps = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(12)], dim=1)
        cache = model.new_cache()
        chunks = torch.cat([model(x[:, :5], cache=cache), model(x[:, 5:], cache=cache)], dim=1)
    assert len(cache) == 4 and cache[3].length == 12
    assert rel_err(steps, full) <= 1e-9
    assert rel_err(chunks, full) <= 1e-9


def test_each_bank_called_once_per_repeat() -> None:
    model = tiny(n_layers=6, group_size=2)  # R = 3
    calls: Counter[str] = Counter()
    rows: list[int] = []

    def count(bank: ExpertBank, x_ND: Tensor, e_N: Tensor) -> Tensor:
        calls[bank.bank_name] += 1
        rows.append(x_ND.shape[0])
        return bank.compute(bank.stacked(), x_ND, e_N)

    x = tokens(2, 8)
    with torch.no_grad():
        ref = model(x)
        banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
        for bank in banks:
            bank.executor = count
        out = model(x)
    assert len(banks) == 6  # per distinct layer: FFN experts, V experts, O experts
    assert calls == {b.bank_name: 3 for b in banks}
    assert set(rows) == {16 * 2, 16 * 4 * 2}  # T·k (FFN) and T·H·k (V, O)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _neg_entropy_pooled(calls: list[Tensor]) -> Tensor:
    """−H(p̄), p̄ the mean softmax over every row of every call (the batch form)."""
    p = torch.softmax(torch.cat(calls), -1).mean(0)
    return (p * p.log()).sum(-1).mean()


def _neg_entropy_per_sequence(calls: list[Tensor], B: int) -> Tensor:
    """The reference's form, by hand: for each sequence b its rows of every call (rows
    b·S .. b·S + S − 1 of each), p̄_b their mean softmax, −H(p̄_b) (mean over heads); mean over b."""
    S = calls[0].shape[0] // B
    per_seq = []
    for b in range(B):
        rows = torch.cat([l[b * S : (b + 1) * S] for l in calls])
        p = torch.softmax(rows, -1).mean(0)
        per_seq.append((p * p.log()).sum(-1).mean())
    return sum(per_seq) / B


@pytest.mark.parametrize("pooling", ["sequence", "batch"])
def test_entropy_regularizer_stacks_all_repeats(pooling: str) -> None:
    cfg = dict(n_layers=6, group_size=2, aux_entropy=0.5, aux_att_entropy=0.25)
    model = tiny(**cfg, entropy_pooling=pooling)
    seen: dict[tuple[int, str], list[Tensor]] = {}
    for g, layer in enumerate(model.layers):
        layer.ffn.router.logits = _recorder(layer.ffn.router.logits, seen, (g, "ffn"))
        layer.attention._route = _recorder(layer.attention._route, seen, (g, "att"))
    ctx = MoEContext()
    B = 3
    model(tokens(B, 8), ctx)
    if pooling == "sequence":
        neg_entropy = lambda calls: _neg_entropy_per_sequence(calls, B)  # noqa: E731
    else:
        neg_entropy = _neg_entropy_pooled
    ffn = [seen[g, "ffn"] for g in range(2)]
    att = [seen[g, "att"] for g in range(2)]  # per call: v then o routing, [T, H, A]
    assert all(len(ls) == 3 for ls in ffn) and all(len(rs) == 6 for rs in att)
    want_ffn = 0.5 * sum(neg_entropy(ls) for ls in ffn)
    want_att = 0.25 * sum(
        neg_entropy([r.logits_TE for r in rs[j::2]]) for rs in att for j in (0, 1)
    )
    torch.testing.assert_close(ctx.aux_losses["entropy"], want_ffn, rtol=1e-12, atol=0)
    torch.testing.assert_close(ctx.aux_losses["att_entropy"], want_att, rtol=1e-12, atol=0)
    per_call = 0.5 * sum(neg_entropy([l]) for ls in ffn for l in ls) / 3
    assert abs(per_call - want_ffn) > 1e-9  # stacking differs from averaging per call
    other = _neg_entropy_pooled if pooling == "sequence" else _neg_entropy_per_sequence
    other_ffn = 0.5 * sum(other(ls) if pooling == "sequence" else other(ls, B) for ls in ffn)
    assert abs(other_ffn - want_ffn) > 1e-6  # the two poolings differ on this batch


def test_selector_inits_follow_the_reference() -> None:
    """FFN router: rows unit-normalised, matrix std kept (equal row norms). Attention
    selectors (`renorm_rows`): row r → w_r/|w_r|·std_r/s, s the std of the normalised matrix."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, -1.0], [2.0, -2.0, 2.0, -2.0]])
    w = w.double()
    rows = [r.tolist() for r in w]
    unit = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]
    s = statistics.stdev([x for r in unit for x in r])
    want = [[x * statistics.stdev(r) / s for x in u] for r, u in zip(rows, unit)]
    got = w.clone()
    _rows_keep_own_std_(got)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    model = tiny()
    sel_norms = model.layers[0].attention.sel_v.norm(dim=-1)
    router_norms = model.layers[0].ffn.router.weight.norm(dim=-1)
    assert sel_norms.max() / sel_norms.min() > 1.05  # each row keeps its own std
    assert router_norms.max() / router_norms.min() < 1 + 1e-6  # drawn in float32


def _recorder(fn: Callable[..., Any], seen: dict, key: tuple) -> Callable[..., Any]:
    """Wrap a bound method so that each call's result is also stored in `seen[key]`."""

    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        seen.setdefault(key, []).append(out)
        return out

    return wrapped








def test_learns_repeating_sequence() -> None:
    model = tiny(torch.float32)
    pattern = tokens(4, 8, seed=5)
    x = pattern.repeat(1, 3)  # [4, 24]: the same 8 tokens three times
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = _loss(model, x, BatchReducer())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first, (first, loss.item())
