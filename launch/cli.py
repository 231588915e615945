"""The flags of `launch.train` beside hydra overrides: --help, --hydra-help, --cfg job, -m.

The config is composed with hydra's compose API (launch/train.py says why), so hydra's own
command line is not there; these are answered here. `--help` is generated from the config
dataclasses (their fields, the comments beside them and their rule tables), the model zoo's
presets (parameter counts of a meta build: nothing is allocated) and the strategy registry, so
it cannot drift from the code. `-m` expands hydra sweep syntax (`seed=0,1 model=a,b`,
`range(0,3)`) with hydra's own override parser into one run per combination.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from launch.errors import UserError


@dataclass
class Command:
    kind: str  # train | help | hydra_help | cfg | multirun
    overrides: list[str] = field(default_factory=list)


FLAGS = "--help, -h, --hydra-help, --cfg job, -m/--multirun"


def parse(argv: list[str]) -> Command:
    """Split the flags from the overrides; an unknown flag is one line naming the known ones."""
    kind, overrides, i = "train", [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            kind = "help"
        elif a == "--hydra-help":
            kind = "hydra_help"
        elif a in ("-m", "--multirun"):
            kind = "multirun" if kind == "train" else kind
        elif a in ("--cfg", "-c") or a.startswith("--cfg="):
            what = a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            if what != "job":
                raise UserError(
                    f"--cfg {what or '(nothing)'}: only --cfg job is supported (it prints the "
                    "composed config; the hydra node is fixed in configs/config.yaml)"
                )
            kind = "cfg" if kind in ("train", "multirun") else kind
        elif a.startswith("-"):
            raise UserError(f"unknown option {a!r}: the options are {FLAGS}; the rest are "
                            "overrides key=value (see --help)")  # fmt: skip
        else:
            overrides.append(a)
        i += 1
    return Command(kind, overrides)


# -- multirun -------------------------------------------------------------------------------


def sweep(overrides: list[str]) -> list[list[str]]:
    """One override list per combination of the sweep overrides (hydra's BasicSweeper order:
    the cartesian product, the last key varying fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"bad sweep override ({first}): e.g. -m seed=0,1 model=a,b") from e
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        for o in parsed
        if o.is_sweep_override()
    ]
    return [[*fixed, *combo] for combo in itertools.product(*axes)]


# -- --help ---------------------------------------------------------------------------------


def field_notes(cls: type) -> dict[str, str]:
    """Field name -> its comment in the dataclass source (trailing, else the lines above)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    notes = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            row = node.lineno - 1
            _, sep, tail = lines[row].partition("  # ")
            above = []
            j = row - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                above.insert(0, lines[j].strip().lstrip("#").strip())
                j -= 1
            text = tail.strip() if sep else " ".join(above)
            notes[node.target.id] = text.replace("fmt: skip", "").strip()
    return notes


def _rules() -> dict[str, Any]:
    from launch.validation import rule_tables

    return {f"{s}.{r.key}": r for s, rules in rule_tables() for r in rules}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


def key_lines(section: str, obj: Any, width: int = 100) -> list[str]:
    """`  section.key=default   comment [allowed]` for every field of a config dataclass."""
    notes, rules = field_notes(type(obj)), _rules()
    out = []
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        note = notes.get(f.name, "")
        rule = rules.get(key)
        if rule is not None and not note:
            note = f"[{rule.allowed}]"
        head = f"  {key}={_value(getattr(obj, f.name))}"
        room = max(30, width - max(len(head), 38) - 2)
        out.append(f"{head:<38}  {textwrap.shorten(note, room, placeholder=' …')}".rstrip())
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def model_lines() -> list[str]:
    from models.common.params import parameter_counts
    from models.registry import build_model, model_presets

    out = []
    for name, cfg in model_presets().items():  # by family, sizes in the zoo's order
        total, active = parameter_counts(build_model(cfg, device="meta"))
        out.append(f"    {name:<15} {_count(total):>7} parameters, {_count(active):>7} active")
    return out


def strategy_lines() -> list[str]:
    import sys

    from fssdp.strategies.registry import strategy, strategy_names

    out = []
    for name in strategy_names():
        doc = (sys.modules[strategy(name).__module__].__doc__ or "").strip().split("\n\n")[0]
        line = re.sub(r"\s*\(DESIGN\.md[^)]*\)", "", " ".join(doc.split())).split(": ", 1)[-1]
        out.append(f"    {name:<7} {line}")
    return out


def help_text() -> str:
    from launch.config import DATA_SOURCES, Config, group_options, register_configs
    from models.registry import model_presets

    register_configs()
    cfg = Config(model=model_presets()["gpt_moe_tiny"])
    experiments = ", ".join(group_options("experiment")) or "(none)"
    parts = [
        USAGE.strip(),
        "",
        "Groups (group=option):",
        "  model=          (default gpt_moe_tiny; counts of a meta build: total, active per token)",
        *model_lines(),
        "  parallel=       (default ddp)",
        *strategy_lines(),
        f"  data=           {' | '.join(DATA_SOURCES)} (default pystdlib; see data.name below)",
        "  optim=          " + " | ".join(group_options("optim")) + " (sets optim.name)",
        f"  experiment=     {experiments} (what ./train.sh adds: the README's default job)",
        "",
        "Keys (key=default; the one-line notes are the config dataclasses' comments):",
        "  seed=0                                the global batch of step s is drawn from "
        "(seed, s)",
    ]
    for section in ("train", "optim", "data", "parallel"):
        parts += key_lines(section, getattr(cfg, section))
    parts += ["  model.<key>: the family's fields, e.g. (gpt_moe):"]
    parts += key_lines("model", cfg.model)
    parts += ["", FOOTER.strip()]
    return "\n".join(parts)


USAGE = """
usage: python -m launch.train [override ...]            world 1 (no torchrun)
       torchrun --nproc_per_node N -m launch.train [override ...]
       ./train.sh [override ...]                          the default job, 2 CPU ranks
       python -m launch.train --cfg job [override ...]    print the composed config, run nothing
       python -m launch.train -m key=a,b [override ...]   a sweep: one run per combination
       python -m launch.train --hydra-help                override syntax
"""

FOOTER = """
Every value is checked before any rank starts (one line `fssdp: error: ...`, exit 2).
Other tools: python -m launch.prepare_data | launch.eval | launch.generate | launch.export |
launch.report | launch.estimate (each has --help).
"""

HYDRA_HELP = """
Overrides are hydra's (https://hydra.cc/docs/advanced/override_grammar/basic/):
  key=value            set a key            train.steps=500  optim.lr=1e-3
  group=option         choose a preset      model=moeut_tiny  parallel=fssdp
  +key=value           add a key            (refused unless a config dataclass declares it)
  key=[a,b]            a list               train.profile_steps=[3,5]
  hydra.run.dir=DIR    the run directory    (default runs/<timestamp>; resume: the same DIR)
Sweeps (with -m / --multirun): key=a,b  key=range(0,3)  model=gpt_moe_tiny,moeut_tiny; one run
per combination, each in hydra.sweep.dir/<n> (default runs/<timestamp>-sweep/<n>), one after the
other in the same processes (under torchrun every rank runs the same list).
--cfg job prints the composed job config (what config.yaml would hold) and exits.
"""
