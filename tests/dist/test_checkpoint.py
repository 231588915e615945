"""Reshardable checkpoints: a save at world N under one strategy loads at world M under another
with identical weights and optimizer state, and training goes on along the uninterrupted
trajectory (world-size invariance, models/README.md).

One module fixture runs five sessions (worlds 2, 4, 2, 3 as gloo process groups, then world 1 in
this process); each session trains or resumes two jobs. A resumed job re-saves right after
loading, so the source checkpoint and the re-saved one can be compared entry by entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file

from launch import checkpoint as ckpt
from launch.build import build_trainer
from launch.consolidate import load_full_model, load_run_config
from launch.dist import DistInfo
from launch.export import main as export_main
from launch.train import compose_config
from models.registry import build_model
from tests.support.harness import run_distributed
from tests.support.shared import shared

STEPS = 4  # every job's schedule; checkpoints are taken at step 2
BASE = [
    "model=gpt_moe_tiny",
    "model.n_layers=2",
    "data=synthetic",
    "train.dtype=float64",
    "train.global_batch_size=12",  # divisible by 1, 2, 3 and 4
    "train.seq_len=32",
    f"train.steps={STEPS}",
    "train.progress=false",
    "train.phase_timing=false",
    "train.keep_last=0",
    "optim.warmup_steps=2",
    "data.val_batches=0",
]
TOL = 1e-8  # float64, different reduction orders per world size / strategy
# The world-1 session saves and loads without a process group, as DCP allows (it warns).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trainer(rank: int, world: int, strategy: str, run_dir: Path) -> Any:
    job, _ = compose_config([*BASE, f"parallel={strategy}"])
    cfg: Any = OmegaConf.to_object(job)
    info = DistInfo(rank, world, rank, world, torch.device("cpu"))
    trainer = build_trainer(cfg, info, run_dir)
    if rank == 0:  # what consolidate reads to rebuild the model
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(job))
    return trainer


def _job(rank: int, world: int, spec: dict[str, Any]) -> list[float]:
    """Train (spec["src"] None) or resume from spec["src"]; save at step 2; losses after."""
    run_dir = Path(spec["dir"])
    trainer = _trainer(rank, world, spec["strategy"], run_dir)
    if spec.get("src"):
        assert trainer.resume(path=Path(spec["src"])) == 2
        trainer.save()  # straight after loading: compared with the source
    losses = []
    while trainer.step < spec.get("until", STEPS):
        losses.append(trainer.train_step()["loss"])
        if trainer.step == 2 and not spec.get("src"):
            trainer.save()
    if dist.is_initialized():
        dist.barrier()
    return losses


def _session(rank: int, world: int, specs: list[dict[str, Any]]) -> list[list[float]]:
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    return [_job(rank, world, spec) for spec in specs]


def _step2(run: Path) -> Path:
    return ckpt.step_dir(run / "checkpoints", 2)


# Jobs are (name, strategy, source run or None, steps to train to); a resumed job's run holds
# its re-save, which later sessions load in turn. One session per world size, in order; world 1
# runs in this process.
SESSIONS: list[tuple[int, list[tuple[str, str, str | None, int]]]] = [
    (2, [("fssdp2", "fssdp", None, 4), ("ddp2", "ddp", None, 2)]),
    (4, [("fssdp2>fssdp4", "fssdp", "fssdp2", 4), ("ddp2>ep4", "ep", "ddp2", 4)]),
    (2, [("fssdp4>ddp2", "ddp", "fssdp2>fssdp4", 4), ("ep4>fssdp2", "fssdp", "ddp2>ep4", 4)]),
    (3, [("fssdp2>ep3", "ep", "fssdp2", 4), ("ddp2>fsdp3", "fsdp", "ddp2", 4)]),
    (1, [("fsdp3>none1", "none", "ddp2>fsdp3", 4), ("fssdp2>none1", "none", "fssdp2", 4)]),
]
SOURCE = {name: src for _, jobs in SESSIONS for name, _, src, _ in jobs if src}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[float]]]:
    return shared(tmp_path_factory, "checkpoint-runs", _sessions)  # read, never changed


def _sessions(root: Path) -> tuple[Path, dict[str, list[float]]]:
    losses: dict[str, list[float]] = {}
    for world, jobs in SESSIONS:
        specs = [
            {
                "strategy": strategy,
                "dir": str(root / name),
                "src": str(_step2(root / src)) if src else None,
                "until": until,
            }
            for name, strategy, src, until in jobs
        ]
        if world == 1:
            out = [[_job(0, 1, spec) for spec in specs]]
        else:
            out = run_distributed(_session, world, specs, timeout_s=240)
        for (name, *_), got in zip(jobs, out[0]):
            losses[name] = got
    return root, losses


@pytest.mark.parametrize("name", list(SOURCE))
def test_resumed_state_is_identical(runs: tuple[Path, dict], name: str) -> None:
    root, _ = runs
    src = ckpt.read_tensors(_step2(root / SOURCE[name]), "app.")
    again = ckpt.read_tensors(_step2(root / name), "app.")
    assert src.keys() == again.keys(), sorted(src.keys() ^ again.keys())[:5]
    assert any(k.startswith("app.experts.optim.") for k in src)
    for key in src:
        assert torch.equal(src[key], again[key]), f"{name}: {key} differs after the round trip"


def test_resumed_losses_follow_the_uninterrupted_run(runs: tuple[Path, dict]) -> None:
    _, losses = runs
    ref = losses["fssdp2"]
    assert len(ref) == STEPS and len(losses["ddp2"]) == 2
    for a, b in zip(losses["ddp2"], ref):  # the reference agrees with another strategy
        assert abs(a - b) <= TOL * abs(b), ("ddp2", a, b)
    for name in SOURCE:
        got = losses[name]
        assert len(got) == 2, (name, got)
        for s, (a, b) in enumerate(zip(got, ref[2:]), start=3):
            assert abs(a - b) <= TOL * abs(b), f"{name}: step {s}: {a} vs {b}"


def test_every_strategy_writes_one_layout_and_consolidates(runs: tuple[Path, dict]) -> None:
    root, _ = runs
    native = {n: set(ckpt.read_tensors(_step2(root / n), "app.")) for n in ("fssdp2", "ddp2")}
    assert native["fssdp2"] == native["ddp2"]
    assert not any(k.startswith("app.model.") and ".experts." in k for k in native["ddp2"])
    ref, _, _ = load_full_model(root / "fssdp2", step=2)
    for name in ("ddp2", "ddp2>fsdp3", "ddp2>ep4"):
        model, _, step = load_full_model(root / name)
        assert step == 2
        for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), (name, n)


def test_export_is_one_safetensors_file_loadable_without_distributed(
    runs: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = runs
    run = root / "fssdp4>ddp2"  # written by ddp at world 2 from a world-4 fssdp checkpoint
    export_main([str(run), "--out", str(tmp_path / "export")])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.yaml",
        "model.safetensors",
    ]
    cfg = load_run_config(tmp_path / "export")
    torch.manual_seed(123)  # other initial weights than the reference: loading must overwrite
    fresh = build_model(cfg.model).to(torch.float64)
    fresh.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")))
    ref, _, _ = load_full_model(run)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), ref(tokens))
