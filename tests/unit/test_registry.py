"""The model house: families register their own specs, the registry lists none, FSDP units and
routers are found by the spec's hook and by `isinstance`, and models/ imports no runtime.

Legend: B batch, S sequence, D model width.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import models.spec as spec_mod
from models.common.context import MoEContext
from models.common.experts import MLPExperts
from models.common.layers import Embedding
from models.common.moe import MoEFeedForward
from models.common.router import Router, TopKRouter
from models.registry import build_model, model_presets, model_specs, preset, spec_for
from models.spec import ModelSpec, default_fsdp_units, register

MODELS = Path(__file__).resolve().parents[2] / "models"
FAMILIES = ["gpt_moe", "moeut", "sut", "umoe", "jamba"]
TINY = sorted(n for n in model_presets() if n.endswith("_tiny"))  # every registered family


def test_every_family_registers_itself_and_the_registry_names_none() -> None:
    specs = model_specs()
    assert set(FAMILIES) <= set(specs)
    for name in FAMILIES:
        assert specs[name].name == name and f"{name}_tiny" in model_presets()
        assert spec_for(preset(f"{name}_tiny")) is specs[name]
    src = (MODELS / "registry.py").read_text()
    assert not [f for f in FAMILIES if f in src]
    with pytest.raises(KeyError, match="unknown model family"):
        spec_for(object())


@pytest.mark.parametrize("first", ["models.gpt_moe", "models.registry", "models.jamba"])
def test_no_import_cycle(first: str) -> None:
    """Any module of the zoo imports first in a fresh interpreter."""
    code = f"import {first}; import models.registry as r; print(len(r.model_specs()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= len(FAMILIES)


def test_models_import_no_runtime() -> None:
    for path in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in ("fssdp", "collectives", "launch")]
            assert not bad, (path, bad)


@pytest.mark.parametrize("name", FAMILIES)
def test_default_fsdp_units_are_the_repeated_layers(name: str) -> None:
    """The children of the model's ModuleLists (what fssdp/dense.py:layers took); SUT has its
    one shared layer outside any list, so the root unit holds everything."""
    model = build_model(preset(f"{name}_tiny"), device="meta")
    units = spec_for(model.cfg).fsdp_units(model)
    want = {"gpt_moe": "blocks", "sut": None}.get(name, "layers")
    assert [id(u) for u in units] == [id(u) for u in (getattr(model, want) if want else [])]
    nested = nn.ModuleList([nn.Sequential(nn.ModuleList([nn.Linear(2, 2)])), nn.Linear(2, 2)])
    assert default_fsdp_units(nn.Sequential(nested)) == list(nested)  # outermost only


@pytest.mark.parametrize("name", TINY)
def test_every_router_is_a_router(name: str) -> None:
    """Every module with router logits subclasses `Router`, so the runtime needs no names."""
    model = build_model(preset(name), device="meta")
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers
    for m in model.modules():
        if callable(getattr(m, "logits", None)):
            assert isinstance(m, Router), type(m).__name__


@dataclass
class _ToyConfig:
    family: str = "toy"
    vocab_size: int = 32
    d_model: int = 8


class _Toy(nn.Module):
    """A newcomer's model: an embedding, one MoE FFN in a ModuleList, a tied head."""

    def __init__(self, cfg: _ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = Embedding(cfg.vocab_size, cfg.d_model, std=0.1)
        self.blocks = nn.ModuleList(
            [MoEFeedForward(TopKRouter(cfg.d_model, 4, 2), MLPExperts(4, cfg.d_model, 16))]
        )

    def forward(self, tokens_BS: Tensor, ctx: MoEContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else MoEContext()
        x_BSD = self.emb(tokens_BS)
        for block in self.blocks:
            x_BSD = x_BSD + block(x_BSD, ctx)
        ctx.finish()
        return x_BSD @ self.emb.weight.T


def test_a_new_family_registers_and_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_mod, "_SPECS", dict(spec_mod._SPECS))  # undone after the test
    spec = register(ModelSpec("toy", _ToyConfig, _Toy, presets={"tiny": _ToyConfig()}))
    assert register(spec) is spec  # re-registering the same spec (a re-import) is fine
    with pytest.raises(ValueError, match="registered twice"):
        register(ModelSpec("toy", _ToyConfig, _Toy))
    with pytest.raises(ValueError, match="preset toy_big"):
        register(ModelSpec("toy", _ToyConfig, _Toy, presets={"big": FAMILIES}))
    model = build_model(preset("toy_tiny"), seed=1)
    assert spec.fsdp_units is default_fsdp_units and spec.fsdp_units(model) == [model.blocks[0]]
    assert model.blocks[0].experts.bank_name == "blocks.0.experts"
    out = model(torch.randint(0, 32, (2, 5)))
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()


def test_a_registered_strategy_is_accepted_by_the_config_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`parallel.strategy` is ruled by the strategy registry, looked up when checked: a strategy
    registered after the rule table was built (as by a newcomer's module) is accepted."""
    import fssdp.strategies.registry as reg
    from fssdp.config import RULES, ParallelConfig, strategy_names
    from fssdp.rules import RuleError, check
    from fssdp.strategies.base import Parallelized

    assert {"none", "ddp", "fsdp", "ep", "fssdp"} <= set(strategy_names())
    with pytest.raises(RuleError, match=r"parallel.strategy='toy' is not allowed \(must be one of"):
        check("parallel", ParallelConfig(strategy="toy"), RULES)
    monkeypatch.setattr(reg, "_STRATEGIES", dict(reg._STRATEGIES))  # undone after the test

    @reg.register("toy")
    class _Toy(Parallelized):
        pass

    assert "toy" in strategy_names() and reg.strategy("toy") is _Toy
    check("parallel", ParallelConfig(strategy="toy"), RULES)
    rule = next(r for r in RULES if r.key == "strategy")
    assert "toy" in f"{rule.allowed}" and "fssdp" in str(rule.allowed)
