"""Suite-wide collection order: the `slow` tests first.

Under pytest-xdist (`./test.sh`: two workers, work stealing) a long test collected last is the
whole run's tail, one worker busy while the other idles. Started first, the long tests run side
by side and the short ones fill the gaps. Order is otherwise kept (the sort is stable), and no
test depends on another's order."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
