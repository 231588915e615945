"""The pretraining switches at world 2, in one process group: `train.compile=true` (under fsdp)
equals eager within fp32 tolerance and really compiles; Ctrl-C (SIGINT) on rank 0 alone stops
`fit` on both ranks after the same step ([Note: preemption] in launch/preempt.py: the ranks
agree), with a checkpoint and one line; `peak_cuda_bytes` is logged only on CUDA;
`train.checkpoints=false` writes no checkpoint (at the end or on Ctrl-C) and
`train.load_figures=0` no tensorboard figure (the benchmarks' settings)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from launch.build import build_trainer
from launch.dist import DistInfo
from launch.train import compose_config
from tests.support.harness import run_distributed
from tests.support.parity import rel_err, train_capture

TINY = ["model=gpt_moe_tiny", "model.n_layers=2", "parallel=fssdp", "data=synthetic"]
FP32 = ["model=gpt_moe_tiny", "model.n_layers=2", "parallel=fsdp", "train.dtype=float32"]


def _trainer(rank: int, tmp: Path, overrides: list[str], on_grads: Any = None) -> Any:
    job, _ = compose_config(
        ["train.global_batch_size=4", "train.seq_len=32", "train.progress=false",
         "data.val_batches=0", *overrides]
    )  # fmt: skip
    cfg: Any = OmegaConf.to_object(job)
    info = DistInfo(rank, 2, rank, 2, torch.device("cpu"))
    return build_trainer(cfg, info, tmp, on_grads=on_grads)


def _compile_case(rank: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    eager = train_capture(rank, 2, FP32, 2)
    counters.clear()
    compiled = train_capture(rank, 2, [*FP32, "train.compile=true"], 2)
    return {"eager": eager, "compiled": compiled, "graphs": counters["stats"]["unique_graphs"]}


def _sigint_case(rank: int, tmp: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    def interrupt(par: Any, step: int) -> None:
        if step == 2 and rank == 0:  # Ctrl-C on rank 0 only, while step 2 is in flight
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp / ("sigint_off" if extra else "sigint")
    args = [*TINY, "train.steps=5", "train.ckpt_every=100", *extra]
    trainer = _trainer(rank, run, args, interrupt)
    out = io.StringIO()
    code = None
    # what fit must restore: the handler before it (not necessarily Python's default: an
    # inductor compile worker pool started by the compile case may have installed its own)
    before = signal.getsignal(signal.SIGINT)
    with contextlib.redirect_stdout(out):
        try:
            trainer.fit()
        except SystemExit as e:
            code = e.code
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    return {"code": code, "out": out.getvalue(), "ckpts": ckpts, "step": trainer.step,
            "handler": signal.getsignal(signal.SIGINT) is before}  # fmt: skip


def _outputs(run: Path) -> dict[str, Any]:
    """The checkpoints and the tensorboard figures a finished run left."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    return {"ckpts": ckpts, "images": sorted(acc.Tags()["images"])}


def _no_outputs_case(rank: int, tmp: Path) -> dict[str, Any]:
    off = ("train.checkpoints=false", "train.load_figures=0")
    _trainer(rank, tmp / "off", [*TINY, "train.steps=2", *off]).fit()
    return {"sigint": _sigint_case(rank, tmp, off), "outputs": _outputs(tmp / "off")}


def _cuda_field_case(rank: int, tmp: Path) -> dict[str, Any]:
    import launch.trainer as tr

    seen: dict[str, Any] = {}
    seen["cpu"] = _trainer(rank, tmp / "a", [*TINY, "train.steps=1"]).fit()
    seen["outputs"] = _outputs(tmp / "a")  # the defaults: a checkpoint and the figures
    real = tr.peak_cuda_bytes
    tr.peak_cuda_bytes = lambda device: 12345 + rank  # as on a CUDA device
    try:
        seen["cuda"] = _trainer(rank, tmp / "b", [*TINY, "train.steps=1"]).fit()
    finally:
        tr.peak_cuda_bytes = real
    seen["none"] = tr.peak_cuda_bytes(torch.device("cpu"))
    return seen


def _all(rank: int, world: int, tmp: str) -> dict[str, Any]:
    root = Path(tmp)  # the same directory on both ranks (DCP writes one checkpoint)
    return {
        "compile": _compile_case(rank),
        "sigint": _sigint_case(rank, root),
        "cuda": _cuda_field_case(rank, root),
        "off": _no_outputs_case(rank, root),
    }


@pytest.mark.slow
def test_compile_sigint_and_cuda_memory(tmp_path: Path) -> None:
    ranks = run_distributed(_all, 2, str(tmp_path), timeout_s=600)
    got = ranks[0]
    c = got["compile"]
    assert c["graphs"] >= 2, c["graphs"]  # attention and norms were compiled, not eager
    assert_close(c["eager"], c["compiled"], 1e-5)

    for rank, r in enumerate(ranks):  # rank 1 saw no signal, yet stopped after the same step
        s = r["sigint"]
        assert s["code"] == 0 and s["step"] == 2, (rank, s)
        assert s["ckpts"] == ["step_00000002"], s
        assert s["handler"], "fit did not restore the SIGINT handler it found"
    lines = [line for line in got["sigint"]["out"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fssdp: stopped by SIGINT after step 2:")
    assert not ranks[1]["sigint"]["out"].strip()  # one line, from rank 0

    m = got["cuda"]
    assert m["none"] is None
    cpu, cuda = m["cpu"][-1], m["cuda"][-1]  # rank 0's records: every rank's figures
    assert "peak_cuda_bytes" not in cpu and min(cpu["peak_rss_bytes"]) > 0
    assert cuda["peak_cuda_bytes"] == [12345, 12346]

    default, off = m["outputs"], got["off"]["outputs"]
    assert default["ckpts"] == ["step_00000001"], default
    assert {"expert_load_heatmap", "replicas_heatmap"} <= set(default["images"]), default
    assert off == {"ckpts": [], "images": []}, off  # nothing at the end of a finished run
    for rank, r in enumerate(ranks):  # nor on Ctrl-C: the ranks still stop together
        s = r["off"]["sigint"]
        assert s["code"] == 0 and s["step"] == 2 and s["ckpts"] == [], (rank, s)
    lines = [line for line in got["off"]["sigint"]["out"].splitlines() if line.strip()]
    assert len(lines) == 1 and "no checkpoint written (train.checkpoints=false)" in lines[0]


def assert_close(ref: dict[str, Any], got: dict[str, Any], tol: float) -> None:
    for lr, lg in zip(ref["loss"], got["loss"]):
        assert abs(lr - lg) <= tol * abs(lr), (lr, lg)
    for gr, gg in zip(ref["grads"], got["grads"]):
        for name in gr:
            assert rel_err(gg[name], gr[name]) <= tol, name
