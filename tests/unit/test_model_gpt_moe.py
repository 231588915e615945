"""GPT-MoE: published parameter counts, causality, cached decoding."""

from __future__ import annotations

import torch

from models.common.context import MoEContext
from models.registry import build_model, preset
from tests.support.causality import assert_causal


def _count(name: str) -> tuple[int, int]:
    m = build_model(preset(name), device="meta")
    total = sum(p.numel() for p in m.parameters())
    emb = m.tok_emb.weight.numel() + m.pos_emb.weight.numel()
    return total, total - emb


def test_published_parameter_counts() -> None:
    # The paper's counts exclude embeddings (MODELS.md).
    for name, target in (("gpt_moe_s", 1.84e9), ("gpt_moe_l", 7.36e9)):
        _, non_emb = _count(name)
        assert abs(non_emb / target - 1) < 0.03, (name, non_emb)


def test_causal_and_cached_decoding_equal_full_forward() -> None:
    torch.manual_seed(0)
    m = build_model(preset("gpt_moe_tiny")).double().eval()
    tokens = torch.randint(0, 256, (2, 12))
    full = m(tokens, MoEContext())
    assert_causal(m, tokens, 7)
    cache = m.new_cache()
    steps = [m(tokens[:, :5], MoEContext(), cache)]
    steps += [m(tokens[:, i : i + 1], MoEContext(), cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-12)


def test_expert_load_and_aux_recorded_per_bank() -> None:
    m = build_model(preset("gpt_moe_tiny", route_skew=4.0))
    ctx = MoEContext()
    m(torch.randint(0, 256, (2, 16)), ctx)
    assert len(ctx.expert_load) == 4 and set(ctx.aux_losses) == {"switch"}
    for counts in ctx.expert_load.values():
        assert counts.sum().item() == 2 * 16 * 2  # tokens × top-k
        assert counts[0] > counts[-1]
