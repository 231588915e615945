"""launch.leave.run_main: a launcher's exit status and output survive leaving with os._exit
([Note: leaving without finalization])."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "returns": ("pass", 0, ""),
    "exit 2": ("sys.exit(2)", 2, ""),
    "exit message": ("sys.exit('a message')", 1, "a message"),
    "raises": ("raise ValueError('boom')", 1, "ValueError: boom"),
}


def _leave(body: str, tmp_path) -> subprocess.CompletedProcess:
    marker = tmp_path / "finalized"
    script = (
        "import atexit, sys\n"
        "from launch.leave import run_main\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
        "def main():\n"
        "    print('said before leaving', end='')\n"  # unflushed: run_main must flush it
        f"    {body}\n"
        "run_main(main)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


@pytest.mark.parametrize("case", list(CASES))
def test_status_output_and_no_finalization(case: str, tmp_path) -> None:
    body, code, err = CASES[case]
    p = _leave(body, tmp_path)
    assert p.returncode == code, p.stderr
    assert p.stdout == "said before leaving"
    assert err in p.stderr
    # the interpreter's teardown (here: its atexit handlers) never ran
    assert not (tmp_path / "finalized").exists()
