"""Module fixtures computed once per test session, shared by the pytest-xdist workers.

Under xdist every worker process builds its own module-scoped fixtures, so when the two workers
each ran a test of one module both trained its reference (10-30 s of the suite each time).
`shared` computes a fixture once per session, under a file lock in the session's temporary root
(which the workers share), and the other workers load what it saved. Without xdist the root is
the session's own temporary directory, so nothing carries over between sessions.

Values must survive `torch.save`. A fixture that produces files writes them under the directory
it is given (fresh for each attempt, so a failed attempt leaves nothing a retry would resume);
tests read those files or copy them, never change them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from filelock import FileLock

T = TypeVar("T")

# A directory every rank of the session sees, for `once` caches outside pytest's fixtures (the
# forked ranks' composed configs, tests/support/parity.py); set by tests/conftest.py.
SESSION_CACHE = "FSSDP_TEST_SESSION_CACHE"


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory every worker of this session sees."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(root: Path, key: str, make: Callable[[], T]) -> T:
    """`make()` once for (`root`, `key`), under a file lock; every later caller, in any
    process, gets a copy of its value (loaded from disk). A `make` that fails saves nothing:
    the next caller tries again."""
    root.mkdir(exist_ok=True)
    saved = root / f"{key}.pt"
    with FileLock(str(root / f"{key}.lock")):
        if saved.exists():
            return torch.load(saved, weights_only=False)
        value = make()
        torch.save(value, saved)
        return value


def shared(tmp_path_factory: pytest.TempPathFactory, key: str, make: Callable[[Path], T]) -> T:
    """`make(directory)` once per session for `key` (`once` in the session's shared root)."""
    root = session_root(tmp_path_factory) / "shared-fixtures"

    def in_own_dir() -> T:
        work = root / f"{key}-{os.getpid()}"
        work.mkdir()
        return make(work)

    return once(root, key, in_own_dir)
