"""The init protocol: meta build + `to_empty` + `init_weights` gives world-size invariant values.

Dense values depend only on (seed, module name), experts only on (seed, bank, expert id): a
rank that holds some rows of a bank, or a shard of a dense parameter, gets exactly those rows of
the full init. Comparisons between the very same computation are bit-exact.

Legend: E experts, O rows held.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from models.common.experts import ExpertBank, MLPExperts
from models.common.init import init_weights
from models.registry import build_model, model_presets, model_specs, preset

TINY = sorted(n for n in model_presets() if n.endswith("_tiny"))  # every registered family


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _meta_to_nan(cfg: object) -> nn.Module:
    """Built on meta, then storage on CPU filled with NaN (what `to_empty` could leave)."""
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype.is_floating_point:
                t.fill_(math.nan)
    return model


def test_every_family_is_covered() -> None:
    assert {"gpt_moe_tiny", "moeut_tiny", "sut_tiny", "umoe_tiny", "jamba_tiny"} <= set(TINY)


def test_same_seed_same_values_different_seed_different_values() -> None:
    cfg = preset("gpt_moe_tiny")
    torch.manual_seed(1)
    a = _state(build_model(cfg, seed=3))
    torch.manual_seed(2)  # the global RNG plays no part
    b = _state(build_model(cfg, seed=3))
    c = _state(build_model(cfg, seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    # every randomly initialised tensor differs; norms (ones/zeros) and biases (zeros) do not
    assert "tok_emb.weight" in differ and "blocks.0.moe.experts.w_in" in differ
    assert all("ln" not in k and not k.endswith("bias") and "b_" not in k for k in differ)
    assert len(differ) == sum(1 for k in a if a[k].unique().numel() > 1)


def test_modules_and_experts_draw_distinct_values() -> None:
    """Seeds differ per module name and per expert id: same-shaped tensors are not copies."""
    m = build_model(preset("gpt_moe_tiny"))
    assert not torch.equal(m.blocks[0].attn.q.weight, m.blocks[1].attn.q.weight)
    w_in = m.blocks[0].moe.experts.w_in
    assert not torch.equal(w_in[0], w_in[1])
    assert not torch.equal(w_in, m.blocks[1].moe.experts.w_in)


def test_global_rng_untouched() -> None:
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    build_model(preset("sut_tiny"))
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("name", TINY)
def test_meta_build_initialises_everything_and_buffers_match_eager(name: str) -> None:
    cfg = preset(name, route_skew=0.5)  # non-zero skew buffers
    model = _meta_to_nan(cfg)
    init_weights(model, seed=0)
    eager = model_specs()[cfg.family].builder(cfg)
    got, want = dict(model.named_buffers()), dict(eager.named_buffers())
    assert got.keys() == want.keys()
    assert any(b.abs().sum() > 0 for b in got.values()) or not got
    for k in got:
        assert torch.equal(got[k], want[k]), k
    for k, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not torch.isnan(t).any(), k
    for (k, p), (k2, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert k == k2 and p.shape == q.shape and p.dtype == q.dtype
    torch.testing.assert_close(_state(model), _state(build_model(cfg)), rtol=0, atol=0)


def test_dtype_conversion_on_meta() -> None:
    cfg = preset("jamba_tiny", route_skew=0.5)
    model = build_model(cfg, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    eager = model_specs()["jamba"].builder(cfg).double()
    for (k, b), (_, b2) in zip(model.named_buffers(), eager.named_buffers()):
        assert torch.equal(b, b2), k
    assert not any(torch.isnan(p).any() for p in model.parameters())


def _keep_rows(bank: ExpertBank, ids: tuple[int, ...]) -> None:
    """What the runtime does on meta: each stacked parameter keeps rows `ids` only."""
    for name, p in list(bank.named_parameters(recurse=False)):
        setattr(bank, name, nn.Parameter(torch.empty(len(ids), *p.shape[1:], device="meta")))
    bank.expert_ids = ids


@pytest.mark.parametrize("name", ["gpt_moe_tiny", "moeut_tiny", "jamba_tiny"])
def test_bank_rows_are_those_of_the_full_init(name: str) -> None:
    full = build_model(preset(name), seed=7)
    part = build_model(preset(name), device="meta")
    banks = [m for m in part.modules() if isinstance(m, ExpertBank)]
    for i, bank in enumerate(banks):
        _keep_rows(bank, (2, 5) if i % 2 == 0 else ())
    part.to_empty(device="cpu")
    init_weights(part, seed=7)
    full_banks = [m for m in full.modules() if isinstance(m, ExpertBank)]
    for i, (bank, ref) in enumerate(zip(banks, full_banks)):
        assert bank.bank_name == ref.bank_name and bank.num_experts == ref.num_experts
        assert bank.expert_numel() == ref.expert_numel()
        for k, rows in bank.stacked().items():
            if i % 2 == 0:
                assert rows.shape[0] == 2 and torch.equal(rows, ref.stacked()[k][[2, 5]])
            else:
                assert rows.shape[0] == 0
    assert any(i % 2 == 1 for i in range(len(banks)))  # an empty bank was among them


def test_bank_reset_parameters_on_held_rows() -> None:
    bank = MLPExperts(6, 4, 8, activation="gelu", bias=True)
    _keep_rows(bank, (1, 4, 5))
    bank.to_empty(device="cpu")
    bank.reset_parameters()
    w = bank.stacked()
    assert w["w_in"].shape == (3, 4, 8) and not torch.isnan(w["w_in"]).any()
    assert torch.equal(w["b_in"], torch.zeros(3, 8))
    assert bank.expert_numel() == 4 * 8 + 8 + 8 * 4 + 4


def test_write_hook_sees_full_values_and_may_keep_a_shard() -> None:
    """A hook that keeps only the second half of every dense tensor's rows (as a DTensor
    shard would) gets exactly that half of the full init; the rest is left alone."""
    cfg = preset("umoe_tiny")
    full = dict(build_model(cfg, seed=2).named_parameters())
    model = _meta_to_nan(cfg)
    seen: list[tuple[int, ...]] = []

    def keep_second_half(dst: Tensor, full_cpu: Tensor) -> None:
        assert full_cpu.device.type == "cpu" and full_cpu.shape == dst.shape
        seen.append(tuple(full_cpu.shape))
        lo = full_cpu.shape[0] // 2 if full_cpu.ndim else 0
        dst[lo:].copy_(full_cpu[lo:]) if full_cpu.ndim else dst.copy_(full_cpu)

    init_weights(model, seed=2, write=keep_second_half)
    banks = {n for n, m in model.named_modules() if isinstance(m, ExpertBank)}
    dense = {k: p for k, p in model.named_parameters() if k.rsplit(".", 1)[0] not in banks}
    assert len(seen) == len(dense) + len(list(model.buffers()))
    for k, p in dense.items():
        lo = p.shape[0] // 2
        assert torch.equal(p[lo:], full[k][lo:]), k
        assert lo == 0 or torch.isnan(p[:lo]).all(), k


def test_values_do_not_depend_on_construction_order() -> None:
    """A model with one more layer (built after it in module order) has the same values for
    every module name the two share."""
    small = _state(build_model(preset("umoe_tiny", n_layers=2), seed=1))
    big = _state(build_model(preset("umoe_tiny", n_layers=3), seed=1))
    assert set(small) < set(big)
    for k, v in small.items():
        assert torch.equal(v, big[k]), k


class _NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


class _ForgetsOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(3))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.a.normal_()


def test_modules_that_break_the_protocol_are_named() -> None:
    with pytest.raises(TypeError, match="no reset_parameters"):
        init_weights(nn.Sequential(_NoReset()), 0)
    with pytest.raises(ValueError, match="0.b"):
        init_weights(nn.Sequential(_ForgetsOne()), 0)
