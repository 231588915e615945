"""The config rule helpers (`Rule`, `at_least`, `one_of`, `check`, …): they live in
models/common/rules.py, dependency-free, so that the model zoo (which imports nothing of fssdp or
launch) declares its rule tables with them too; re-exported here for fssdp and launch."""

from models.common.rules import (
    Rule,
    RuleError,
    above,
    at_least,
    between,
    check,
    multiple_of,
    one_of,
    up_to,
)

__all__ = [
    "Rule",
    "RuleError",
    "above",
    "at_least",
    "between",
    "check",
    "multiple_of",
    "one_of",
    "up_to",
]
