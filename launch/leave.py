"""How a distributed launcher process ends: its exit code, without the interpreter's teardown.

[Note: leaving without finalization]
A gloo process group runs its collectives on C++ worker threads. A worker drops its reference to
a finished work (and so to the work's tensors) a moment after `wait()` has returned on the main
thread; when that reference is the tensor's last and the tensor had a Python object, freeing it
takes the GIL. If the main thread has meanwhile begun interpreter finalization, Python ends a
thread that asks for the GIL with `pthread_exit`, whose unwinding through torch's `noexcept`
destructors calls `std::terminate`: "terminate called without an active exception", SIGABRT,
and torchrun reports a run that had finished, validated and checkpointed as failed. It is a race
with the last collectives of a run (seen about once in thirty two-rank runs on a loaded 2-core
machine; pytorch/pytorch#179291 describes the same crash for groups left undestroyed). The
launchers tear down what they own themselves (metrics and tensorboard closed, run lock released,
process groups destroyed, all in their own `finally`), so there is nothing left for finalization
to do: `run_main` flushes the standard streams and leaves with `os._exit`, never entering it.
Errors keep their usual form: `SystemExit` gives its code (a message is printed as
`sys.exit` would), any other exception its traceback and exit code 1.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_code(e: SystemExit) -> int:
    """The status `sys.exit(e.code)` would leave with (printing a message code as it does)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_main(main: Callable[[], None]) -> NoReturn:
    """Run a launcher's `main()`, then leave with its status, skipping the interpreter's teardown
    ([Note: leaving without finalization])."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = exit_code(e)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130  # the shell's status for an interrupted command
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, then the same exit
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)
