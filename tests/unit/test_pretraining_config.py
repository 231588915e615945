"""Bad values of the pretraining switches end `launch.train.main` with one line and exit 2
before any rank starts: a micro-batch size that does not divide the per-rank batch, and
`train.compile=true` on a CPU machine without a C++ compiler (inductor could not build its
kernels). Plus the pure helpers: micro-batch splitting and the compiled-module choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fssdp.compiled import dense_submodules
from launch import train
from launch.step import split_micro_batches
from tests.support.driver import one_line

SMALL = ["model=gpt_moe_tiny", "model.n_layers=1", "parallel=none", "data=synthetic",
         "train.global_batch_size=8", "train.progress=false"]  # fmt: skip


def _refused(overrides: list[str], tmp_path: Path, capsys: Any) -> str:
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, *overrides, f"hydra.run.dir={run}"])
    assert e.value.code == 2
    assert not run.exists()
    return one_line(capsys.readouterr().err)


def test_micro_batch_size_must_divide_the_batch(tmp_path: Path, capsys: Any) -> None:
    line = _refused(["train.micro_batch_size=3"], tmp_path, capsys)
    assert "train.micro_batch_size=3" in line and "e.g." in line, line


def test_compile_without_a_cxx_compiler_is_one_line(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(["train.compile=true"], tmp_path, capsys)
    assert "train.compile=true" in line and "C++ compiler" in line, line


def test_micro_batches_and_compiled_modules() -> None:
    x, y = torch.arange(12).view(6, 2), torch.arange(12).view(6, 2) + 1
    chunks = split_micro_batches(x, y, 2)
    assert [c[0].tolist() for c in chunks] == [x[:2].tolist(), x[2:4].tolist(), x[4:].tolist()]
    assert len(split_micro_batches(x, y, 0)) == 1 and len(split_micro_batches(x, y, 6)) == 1
    from models.registry import build_model, spec_for  # noqa: F401 - registry import side effect

    job, _ = train.compose_config(["model=jamba_tiny"])
    from omegaconf import OmegaConf

    model = build_model(OmegaConf.to_object(job).model, device="meta")
    names = [n for n, _ in dense_submodules(model)]
    # jamba: the dense layers whole; the MoE layers' norms and mixers, not their FFN or router
    assert "layers.0" in names and "layers.1.mixer" in names and "layers.1.norm_ffn" in names
    assert not any(n.startswith("layers.1.ffn") for n in names), names
    assert "tok_emb" not in names and "lm_head" in names, names


def test_inductor_cache_is_kept_per_cpu_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """[Note: inductor cache per CPU capability]: a user's own directory is left alone."""
    import os

    import torch
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fssdp import compiled

    isa = torch.backends.cpu.get_cpu_capability().lower()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled._cache_per_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(f"cpu_{isa}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's own default
    compiled._cache_per_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(f"cpu_{isa}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    compiled._cache_per_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine"
