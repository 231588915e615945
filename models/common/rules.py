"""Value rules for config dataclasses: one table (`RULES`) beside each dataclass, checked by
`launch/validation.py` before any rank starts work. Dependency-free and in models/ (which
imports nothing of fssdp or launch) so that the zoo, `fssdp` and `launch` all declare rules with
it; `fssdp.rules` re-exports it.

A rule names its field, what is allowed, how to fix a bad value, and one value it refuses (`bad`):
the tests run every rule of every table with that value, so a rule cannot exist untested.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


class RuleError(ValueError):
    """A config value outside its rule; the message is the whole line shown to the user."""


@dataclass(frozen=True)
class Rule:
    key: str  # field name inside the dataclass
    ok: Callable[[Any, Any], bool]  # (value, the whole dataclass instance) -> allowed?
    allowed: str  # what is allowed, in words ("an integer ≥ 1")
    # how to fix it; "{key}" becomes the dotted key ("e.g. {key}=10"), "{cfg.x}" the instance's x
    fix: str
    bad: Any  # one value the rule refuses (an override the tests pass)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def at_least(key: str, lo: float, fix: str, *, note: str = "", finite: bool = True) -> Rule:
    """key ≥ lo (and finite unless `finite=False`); refuses lo - 1."""
    allowed = f"≥ {lo}" + ("" if finite else " (inf allowed)") + (f", {note}" if note else "")
    return Rule(
        key,
        lambda v, _: _num(v) and v >= lo and (not finite or math.isfinite(v)),
        allowed,
        fix,
        lo - 1,
    )


def above(key: str, lo: float, fix: str, *, hi: float = math.inf, note: str = "") -> Rule:
    """lo < key ≤ hi and finite; refuses lo itself."""
    allowed = (f"> {lo} and finite" if hi == math.inf else f"in ({lo}, {hi:g}]") + (
        f", {note}" if note else ""
    )
    return Rule(key, lambda v, _: _num(v) and lo < v <= hi and v < math.inf, allowed, fix, lo)


def between(key: str, lo: float, hi: float, fix: str, *, hi_open: bool = False) -> Rule:
    """lo ≤ key ≤ hi (< hi when `hi_open`); refuses lo - 1."""
    bracket = ")" if hi_open else "]"
    return Rule(
        key,
        lambda v, _: _num(v) and lo <= v and (v < hi if hi_open else v <= hi),
        f"in [{lo}, {hi}{bracket}",
        fix,
        lo - 1,
    )


class _Choices:
    """`one of a | b | c` for a name list looked up each time it is shown or checked (a registry
    that grows after the rule table is built: `parallel.strategy`)."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self.names = names

    def __contains__(self, value: object) -> bool:
        return value in tuple(self.names())

    def __str__(self) -> str:
        return "one of " + " | ".join(self.names())

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def one_of(key: str, choices: Iterable[str] | Callable[[], Iterable[str]], fix: str = "") -> Rule:
    """key is one of `choices`: a fixed list, or a function giving it when the rule runs (then
    `fix` is needed)."""
    names = _Choices(choices) if callable(choices) else tuple(choices)
    if callable(choices) and not fix:
        raise ValueError(f"one_of({key!r}, <function>) needs a fix text")
    return Rule(
        key,
        lambda v, _: v in names,
        names if isinstance(names, _Choices) else "one of " + " | ".join(names),  # type: ignore[arg-type]
        fix or f"e.g. {{key}}={names[0]}",  # type: ignore[index]
        "bogus",
    )


def up_to(key: str, other: str, fix: str, *, lo: int = 1, below: bool = False) -> Rule:
    """lo ≤ key ≤ the field `other` of the same instance (< with `below`); refuses lo - 1."""
    return Rule(
        key,
        lambda v, c: (
            _num(v) and lo <= v and (v < getattr(c, other) if below else v <= getattr(c, other))
        ),
        f"in [{lo}, {other}{')' if below else ']'}",
        fix,
        lo - 1,
    )


def multiple_of(key: str, other: str, fix: str, *, bad: int) -> Rule:
    """key is a multiple of the field `other` (whose own rule, earlier in the table, keeps it
    ≥ 1); `bad` must pass key's own range rule (so the test reaches this one)."""
    return Rule(
        key,
        lambda v, c: _num(v) and getattr(c, other) >= 1 and v % getattr(c, other) == 0,
        f"a multiple of {other}",
        fix,
        bad,
    )


def check(section: str, obj: Any, rules: Iterable[Rule]) -> None:
    """Raise RuleError for the first rule that `obj` (a config dataclass instance) breaks."""
    for r in rules:
        value, key = getattr(obj, r.key), f"{section}.{r.key}"
        if not r.ok(value, obj):
            fix = r.fix.format(key=key, cfg=obj)
            raise RuleError(f"{key}={value!r} is not allowed (must be {r.allowed}): {fix}")
