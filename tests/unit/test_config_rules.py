"""Every rule of every config table (`RULES` beside each config dataclass; fssdp/rules.py): the
rule's own bad value ends `launch.train.main` with one line naming the key, what is allowed and
the fix, exit code 2, before any rank starts work (nothing is created). The config is composed
once and each case swaps one value in, as its override would (tests/e2e/test_bad_input.py runs
a few of them as real overrides). A model family's table (`RULES` beside its config dataclass in
models/<family>.py) is run the same way on the family's tiny preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from launch import train
from launch.validation import rule_tables
from models.registry import model_specs
from tests.support.driver import one_line

SMALL = ["model=gpt_moe_tiny", "model.n_layers=1", "parallel=none", "data=synthetic"]
RULES = [(section, rule) for section, rules in rule_tables() for rule in rules]
IDS = [f"{section}.{rule.key}" for section, rule in RULES]
# Fields that need no range: booleans (typed by the schema) and paths (checked when opened).
NO_RULE = {
    "train": {
        "resume_fallback", "progress", "phase_timing", "routing_trace", "compile", "checkpoints"
    },
    "data": {"path", "val_path"},
    "parallel": {"rematerialize", "cost_aware"},  # booleans
    "optim": set(),
}
SPECS = sorted(model_specs().items())
MODEL_RULES = [(family, rule) for family, spec in SPECS for rule in spec.config_cls.RULES]
MODEL_IDS = [f"{family}.{rule.key}" for family, rule in MODEL_RULES]
NO_MODEL_RULE = {"sut": {"mi_reference_sign"}, "umoe": {"q_norm"}}  # booleans
# Bad values probed before the model tables existed: tracebacks, silent training, or (umoe
# norm_eps=-1) a misleading "loss is nan"; each is now one line naming the key.
PROBED = [
    ("gpt_moe", "expert_hidden", -4), ("gpt_moe", "init_std", -1), ("gpt_moe", "d_model", 0),
    ("gpt_moe", "n_layers", 0), ("gpt_moe", "aux_switch", -1), ("gpt_moe", "route_skew", -1),
    ("moeut", "d_model", 0), ("moeut", "n_layers", 0), ("moeut", "n_heads", 0),
    ("moeut", "d_head", 0), ("moeut", "att_experts", 0), ("moeut", "rope_fraction", 2),
    ("moeut", "expert_hidden", 0), ("sut", "d_model", 0), ("sut", "max_steps", 0),
    ("sut", "expert_hidden", 0), ("sut", "d_head", 0), ("sut", "halt_threshold", 2),
    ("umoe", "d_model", 0), ("umoe", "d_qk", 0), ("umoe", "n_layers", 0), ("umoe", "q_rank", 0),
    ("umoe", "expert_hidden", 0), ("umoe", "norm_eps", -1), ("jamba", "scan_chunk", 0),
    ("jamba", "n_layers", 0), ("jamba", "d_state", 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def base() -> DictConfig:
    return train.compose_config(SMALL)[0]


@pytest.fixture(scope="module")
def family_base(base: DictConfig) -> dict[str, DictConfig]:
    """The small job with each family's tiny preset swapped in (as `model=<family>_tiny`)."""
    jobs = {}
    for family, spec in SPECS:
        jobs[family] = job = base.copy()
        job.model = OmegaConf.structured(spec.presets["tiny"])
    return jobs


def _refused(job: DictConfig, key: str, bad: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
             ) -> str:  # fmt: skip
    """The one error line of `launch.train.main` on `job` with `key` set to `bad` (exit 2,
    nothing created)."""
    job = job.copy()
    OmegaConf.update(job, key, bad)
    run = tmp_path / "run"
    monkeypatch.setattr(train, "compose_config", lambda _: (job, str(run)))
    with pytest.raises(SystemExit) as e:
        train.main([])
    assert e.value.code == 2
    assert not run.exists()  # refused before the run directory was made
    return one_line(capsys.readouterr().err)


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
    line = _refused(base, key, rule.bad, tmp_path, monkeypatch, capsys)
    assert f"{key}=" in line and f"must be {rule.allowed}" in line, line
    assert rule.fix.format(key=key) in line, line


@pytest.mark.parametrize(("family", "rule"), MODEL_RULES, ids=MODEL_IDS)
def test_model_rule_refuses_its_bad_value_in_one_line(
    family_base: dict[str, DictConfig],
    family: str,
    rule: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, job = f"model.{rule.key}", family_base[family]
    line = _refused(job, key, rule.bad, tmp_path, monkeypatch, capsys)
    assert f"{key}=" in line and f"must be {rule.allowed}" in line, line
    cfg = OmegaConf.to_object(job.model)
    setattr(cfg, rule.key, rule.bad)
    assert rule.fix.format(key=key, cfg=cfg) in line, line


@pytest.mark.parametrize(
    ("family", "field", "bad"), PROBED, ids=[f"{f}.{k}={v}" for f, k, v in PROBED]
)
def test_probed_model_values_are_one_line(
    family_base: dict[str, DictConfig],
    family: str,
    field: str,
    bad: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _refused(family_base[family], f"model.{field}", bad, tmp_path, monkeypatch, capsys)
    assert line.startswith(f"fssdp: error: model.{field}=") and "is not allowed" in line, line


def test_every_config_field_has_a_rule_or_needs_none() -> None:
    import launch.config as lc

    types = {f.name: f.type for f in dataclasses.fields(lc.Config)}
    for section, rules in rule_tables():
        fields = {f.name for f in dataclasses.fields(getattr(lc, str(types[section])))}
        ruled = {r.key for r in rules}
        assert ruled <= fields, (section, ruled - fields)
        assert fields - ruled == NO_RULE[section], (section, fields - ruled)


def test_every_model_config_field_has_a_rule_or_needs_none() -> None:
    for family, spec in SPECS:
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        ruled = {r.key for r in spec.config_cls.RULES}
        assert ruled <= fields, (family, ruled - fields)
        assert fields - ruled == NO_MODEL_RULE.get(family, set()), (family, fields - ruled)


def test_every_model_preset_passes_its_rules() -> None:
    from fssdp.rules import RuleError, check

    failed = []
    for family, spec in SPECS:
        for size, cfg in spec.presets.items():
            try:
                check(f"model ({family}_{size})", cfg, spec.config_cls.RULES)
            except RuleError as err:
                failed.append(str(err))
    assert SPECS and not failed, failed


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
