"""The bf16 grouped-GEMM expert path (CUDA only; skips cleanly without a GPU)."""

from __future__ import annotations

import pytest
import torch

from models.common import experts
from models.common.experts import MLPExperts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no grouped matmul")
def test_grouped_gemm_path_equals_per_expert_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    bank = MLPExperts(8, 256, 512, activation="swiglu", bias=False).cuda().bfloat16()
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    e = torch.randint(0, 8, (1000,), device="cuda")
    e[:300] = 3  # skewed, some experts with few rows
    fast = bank(x, e)
    monkeypatch.setattr(experts, "_grouped_mm_path", lambda *a: None)
    loop = bank(x, e)
    torch.testing.assert_close(fast.float(), loop.float(), rtol=2e-2, atol=2e-2)


