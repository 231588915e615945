"""The CLI's flags (--help, --cfg job, sweeps), the LR schedule as a LambdaLR (same values as
`lr_factor`, old checkpoints' `scheduler.step` restores it), the optimizers by name, the progress
line's ETA, and the owner-labelled load figures; all in-process, no training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch import cli, train
from launch.errors import UserError
from launch.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    lr_factor,
    restore_scheduler,
    scheduler_state,
)
from tests.support.driver import one_line


def test_help_lists_presets_strategies_and_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from fssdp.strategies.registry import strategy_names
    from models.registry import model_presets

    train.main(["--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in model_presets():
        assert any(line.split()[:1] == [name] and "active" in line for line in lines), name
    for name in strategy_names():
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "train.steps=200" in out and "optim.name=adamw" in out and "data.path=null" in out
    # a field's comment, read from the dataclass source (not a second hand-kept list)
    assert "sequences per optimizer step, split evenly over ranks" in out
    assert "DESIGN.md" not in out


def test_cfg_job_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    train.main(["--cfg", "job", "model=moeut_tiny", "train.steps=7"])
    job = OmegaConf.create(capsys.readouterr().out)
    assert job.train.steps == 7 and job.model.family == "moeut"
    for bad in (["--cfg", "hydra"], ["--bogus"], ["--cfg", "job", "train.steps=abc"]):
        with pytest.raises(SystemExit) as e:
            train.main(bad)
        assert e.value.code == 2
        one_line(capsys.readouterr().err)


def test_sweep_expands_hydra_syntax_in_order() -> None:
    jobs = cli.sweep(["train.steps=2", "seed=0,1", "model=gpt_moe_tiny,moeut_tiny"])
    assert jobs == [
        ["train.steps=2", "seed=0", "model=gpt_moe_tiny"],
        ["train.steps=2", "seed=0", "model=moeut_tiny"],
        ["train.steps=2", "seed=1", "model=gpt_moe_tiny"],
        ["train.steps=2", "seed=1", "model=moeut_tiny"],
    ]
    assert cli.sweep(["seed=range(0,3)"]) == [["seed=0"], ["seed=1"], ["seed=2"]]
    with pytest.raises(UserError, match="bad sweep override"):
        cli.sweep(["seed=[0,"])


def test_scheduler_matches_lr_factor_and_restores_from_either_checkpoint() -> None:
    cfg, total = OptimConfig(lr=0.1, warmup_steps=3, min_lr_ratio=0.2), 10
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([("w", p)], cfg)
    sched = build_scheduler(opt, total, cfg)
    assert all("initial_lr" not in g for g in opt.param_groups)  # older checkpoints still load
    for step in range(total):
        assert opt.param_groups[0]["lr"] == cfg.lr * lr_factor(step, total, cfg)
        opt.step()
        sched.step()
    for saved in ({"step": 6}, scheduler_state(sched, 6)):  # before / after the LambdaLR
        fresh = build_optimizer([("w", p)], cfg)
        s2 = build_scheduler(fresh, total, cfg)
        restore_scheduler(s2, dict(saved))
        assert fresh.param_groups[1]["lr"] == cfg.lr * lr_factor(6, total, cfg)
        fresh.step()
        s2.step()
        assert fresh.param_groups[0]["lr"] == cfg.lr * lr_factor(7, total, cfg)


@pytest.mark.parametrize(("name", "impl"), [("sgd", "fused"), ("adafactor", "foreach"),
                                            ("adamw", "fused"), ("adam", "single")])  # fmt: skip
def test_optimizers_by_name_step_a_parameter(name: str, impl: str) -> None:
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = build_optimizer([("w", p)], OptimConfig(name=name, impl=impl))
    assert type(opt).__name__.lower() == name
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3, 4))


def test_fused_is_refused_where_torch_has_none() -> None:
    from fssdp.rules import RuleError, check
    from launch.optim import RULES

    with pytest.raises(RuleError, match="optim.impl='fused' is not allowed .*fused only for"):
        check("optim", OptimConfig(name="adafactor", impl="fused"), RULES)


def test_progress_line_has_an_eta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, True, 10, True)
    for step in (1, 2):
        log.log({"step": step, "loss": 1.0, "tokens_per_s": 5.0})
    log.close()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "step 2/10" in last and "<" in last and "loss 1.0000" in last, last


def test_load_figures_name_owners(tmp_path: Path) -> None:
    """EP runs from before `owners` was logged get EP's contiguous layout; the hot rank is the
    one whose experts take the tokens."""
    from launch import report, report_load

    rec = {"step": 1, "loss": 1.0, "rank_step_time_s": [1.0, 1.0],
           "expert_load": {"b.experts": [90, 10, 0, 0]}}  # fmt: skip
    owners = report_load.owners_per_record([rec], "ep")
    assert owners == [{"b.experts": [0, 0, 1, 1]}]
    assert report_load.rank_load([rec], owners) is not None
    assert report_load.owners_per_record([rec], "fssdp") == [None]  # unknown: not guessed
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "config.yaml").write_text("parallel:\n  strategy: ep\nseed: 0\n")
    page, _ = report.write_report(tmp_path)
    html = page.read_text()
    assert "Load per owning rank" in html and "strategy: ep" in html  # figure and config
