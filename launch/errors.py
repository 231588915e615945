"""User-facing failures: one clear line (what is wrong, how to fix it) and exit code 2."""

from __future__ import annotations

import errno
import os
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input that the user can fix. The message is the whole line shown."""


def fail(message: str) -> NoReturn:
    print(f"fssdp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


# What to do about a file-system error, by errno (the cases a cluster job meets).
_OS_FIXES = {
    errno.ENOSPC: "free space on that file system (or lower train.keep_last) or move hydra.run.dir",
    errno.EDQUOT: "the disk quota is used up: free space, or move hydra.run.dir",
    errno.EROFS: "the file system is read-only: use a writable hydra.run.dir",
    errno.EACCES: "check its permissions, or use another path",
    errno.EPERM: "check its permissions, or use another path",
    errno.ENOTDIR: "a file stands where a directory is expected: use another path",
    errno.EISDIR: "a directory stands where a file is expected: use another path",
    errno.EEXIST: "a file stands where a directory is expected: use another path",
    errno.ENOENT: "it does not exist (removed while the job ran?): check the path",
    errno.ESTALE: "the network file system lost the file (deleted or re-exported on the server): "
    "check the mount, then restart; train.resume=auto continues from the last checkpoint",
    errno.EIO: "the disk or mount failed: check it, then restart (train.resume=auto)",
}


def os_error_text(e: OSError) -> str:
    """`<path>: <cause> [ERRNO]` for an OSError, without the fix."""
    name = errno.errorcode.get(e.errno or 0, "")
    cause = e.strerror or str(e) or type(e).__name__
    where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
    return f"{where}{cause}" + (f" [{name}]" if name else "")


def os_error_fix(e: OSError) -> str:
    return _OS_FIXES.get(e.errno or 0, "check the path and the file system")


def os_error_line(e: OSError, what: str = "") -> str:
    """One line for a file-system error: what was being done, the path, the cause, the fix."""
    return f"{what + ': ' if what else ''}{os_error_text(e)}: {os_error_fix(e)}"
