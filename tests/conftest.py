"""Suite-wide collection order: the `slow` tests first.

Under pytest-xdist (`./test.sh`: two workers, work stealing) a long test collected last is the
whole run's tail, one worker busy while the other idles. Started first, the long tests run side
by side and the short ones fill the gaps. Order is otherwise kept (the sort is stable), and no
test depends on another's order.

`FSSDP_TEST_SESSION_CACHE` points the session's ranks at one cache (`once` in
tests/support/shared.py; the composed configs of tests/support/parity.py), shared by the xdist
workers."""

from __future__ import annotations

import os

import pytest

from tests.support.shared import SESSION_CACHE, session_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Set before any rank starts: the forkserver and its ranks inherit the environment."""
    os.environ[SESSION_CACHE] = str(session_root(tmp_path_factory) / "session-cache")
