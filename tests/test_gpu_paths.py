"""GPU-only paths (CUDA + NCCL). CI has no GPU: these skip there and run on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys

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


@cuda
def test_fssdp_trains_on_nccl(tmp_path) -> None:  # noqa: ANN001
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "parallel=fssdp",
        "train.steps=3",
        "train.global_batch_size=4",
        "train.seq_len=32",
        f"hydra.run.dir={tmp_path}",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 3
