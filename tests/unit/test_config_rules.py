"""Every rule of every config table (`RULES` beside each config dataclass; fssdp/rules.py): the
rule's own bad value ends `launch.train.main` with one line naming the key, what is allowed and
the fix, exit code 2, before any rank starts work (nothing is created). The config is composed
once and each case swaps one value in, as its override would (tests/e2e/test_bad_input.py runs
a few of them as real overrides)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from launch import train
from launch.validation import rule_tables
from tests.support.driver import one_line

SMALL = ["model=gpt_moe_tiny", "model.n_layers=1", "parallel=none", "data=synthetic"]
RULES = [(section, rule) for section, rules in rule_tables() for rule in rules]
IDS = [f"{section}.{rule.key}" for section, rule in RULES]
# Fields that need no range: booleans (typed by the schema) and paths (checked when opened).
NO_RULE = {
    "train": {"resume_fallback", "progress", "phase_timing", "routing_trace"},
    "data": {"path", "val_path"},
    "parallel": {"rematerialize"},
    "optim": set(),
}


@pytest.fixture(scope="module")
def base() -> DictConfig:
    return train.compose_config(SMALL)[0]


@pytest.mark.parametrize(("section", "rule"), RULES, ids=IDS)
def test_rule_refuses_its_bad_value_in_one_line(
    base: DictConfig,
    section: str,
    rule: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = f"{section}.{rule.key}"
    job = base.copy()
    OmegaConf.update(job, key, rule.bad)
    run = tmp_path / "run"
    monkeypatch.setattr(train, "compose_config", lambda _: (job, str(run)))
    with pytest.raises(SystemExit) as e:
        train.main([])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"{key}=" in line and f"must be {rule.allowed}" in line, line
    assert rule.fix.format(key=key) in line, line
    assert not run.exists()  # refused before the run directory was made


def test_every_config_field_has_a_rule_or_needs_none() -> None:
    import launch.config as lc

    types = {f.name: f.type for f in dataclasses.fields(lc.Config)}
    for section, rules in rule_tables():
        fields = {f.name for f in dataclasses.fields(getattr(lc, str(types[section])))}
        ruled = {r.key for r in rules}
        assert ruled <= fields, (section, ruled - fields)
        assert fields - ruled == NO_RULE[section], (section, fields - ruled)


def test_a_rule_names_nan_and_inf_too(base: DictConfig) -> None:
    from fssdp.rules import RuleError, check
    from launch.optim import RULES

    for bad in (float("nan"), float("inf"), -1e-3):
        cfg = OmegaConf.to_object(base).optim  # type: ignore[union-attr]
        cfg.lr = bad
        with pytest.raises(RuleError, match=r"optim.lr=.*\(must be in \(0, 1e\+30\]\)"):
            check("optim", cfg, RULES)


def test_a_model_family_may_declare_rules_too(
    base: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models/ owns its dataclasses; a RULES tuple beside one is checked like the others."""
    from fssdp.rules import at_least
    from launch.errors import UserError
    from launch.validation import validate

    cfg: Any = OmegaConf.to_object(base)
    monkeypatch.setattr(
        type(cfg.model), "RULES", (at_least("d_model", 1, "e.g. {key}=64"),), raising=False
    )
    validate(cfg, 1)
    cfg.model.d_model = 0
    with pytest.raises(
        UserError, match=r"model.d_model=0 is not allowed \(must be ≥ 1\): e.g. model.d_model=64"
    ):
        validate(cfg, 1)
