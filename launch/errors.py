"""User-facing failures: one clear line (what is wrong, how to fix it) and exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input that the user can fix. The message is the whole line shown."""


def fail(message: str) -> NoReturn:
    print(f"fssdp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
