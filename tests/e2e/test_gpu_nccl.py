"""fssdp under torchrun on NCCL (CUDA only; skips cleanly without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


