"""GPT-MoE: published parameter counts, causality, cached decoding."""

from __future__ import annotations

import pytest
import torch

from models.common.context import MoEContext
from models.registry import build_model, preset
from tests.support.causality import assert_causal
from tests.unit.test_router_losses import hf_load_balancing_loss


def _count(name: str) -> tuple[int, int]:
    m = build_model(preset(name), device="meta")
    total = sum(p.numel() for p in m.parameters())
    emb = m.tok_emb.weight.numel() + m.pos_emb.weight.numel()
    return total, total - emb


def test_published_parameter_counts() -> None:
    # The paper's counts exclude embeddings.
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


@pytest.mark.parametrize("pooling", ["per_layer", "pooled"])
def test_switch_loss_per_layer_by_default(pooling: str) -> None:
    """Default: GShard's form, one Switch loss per MoE layer, summed; pooled: transformers'
    `load_balancing_loss_func` over every layer's logits together."""
    m = build_model(preset("gpt_moe_tiny", aux_pooling=pooling)).double()
    seen: list[torch.Tensor] = []
    for block in m.blocks:
        fn = block.moe.router.logits
        block.moe.router.logits = lambda x, fn=fn: seen.append(fn(x)) or seen[-1]
    ctx = MoEContext()
    m(torch.randint(0, 256, (2, 12)), ctx)
    assert len(seen) == 4
    if pooling == "pooled":
        want = hf_load_balancing_loss(seen, 8, 2)
    else:
        want = sum(hf_load_balancing_loss([lg], 8, 2) for lg in seen)
    assert abs(ctx.aux_losses["switch"].item() / (0.01 * want.item()) - 1) <= 1e-12


def test_expert_load_and_aux_recorded_per_bank() -> None:
    m = build_model(preset("gpt_moe_tiny", route_skew=4.0))
    ctx = MoEContext()
    m(torch.randint(0, 256, (2, 16)), ctx)
    assert len(ctx.expert_load) == 4 and set(ctx.aux_losses) == {"switch"}
    for counts in ctx.expert_load.values():
        assert counts.sum().item() == 2 * 16 * 2  # tokens × top-k
        assert counts[0] > counts[-1]
