"""Many `launch.train.main` calls in one process (a torch import is paid once, not per case).

`Driver` starts one process that calls `launch.train.main(args)` for each case sent to it
(the same function `python -m launch.train` runs; `fail()` exits with SystemExit(2)), with the
case's extra environment, and returns each case's exit code, stderr and stdout. `hashes` and
`one_line` are what the bad-input tests check: nothing saved changed, exactly one error line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from tests.support.launch import ENV


def drive() -> None:
    """Driver process: one JSON case [args, env] per stdin line, one JSON result per line."""
    import contextlib
    import io

    from launch.train import main

    for line in sys.stdin:
        args, env = json.loads(line)
        saved = dict(os.environ)
        os.environ.update(env)
        err, out = io.StringIO(), io.StringIO()
        code: object = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(args)
            except SystemExit as e:
                code = e.code
            except Exception:  # noqa: BLE001 - a traceback is a result too (and a bug)
                traceback.print_exc()
                code = "traceback"
        os.environ.clear()
        os.environ.update(saved)
        result = {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}
        print(json.dumps(result), file=sys.__stdout__, flush=True)


class Driver:
    """A driver process kept alive across cases (`with Driver() as d: d.run(args)`), so that a
    test can act between cases (kill a job, remount a file system) without a new process."""

    def __init__(self, timeout: float = 300) -> None:
        self.timeout = timeout
        cmd = [sys.executable, "-c", "from tests.support.driver import drive; drive()"]
        self.log = tempfile.TemporaryFile("w+")  # fd-level output (C++ warnings): never blocks
        self.proc = subprocess.Popen(
            cmd, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True,
        )  # fmt: skip

    def run(self, args: list[str], env: dict[str, str] | None = None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([args, env or {}]) + "\n")
        self.proc.stdin.flush()
        timer = threading.Timer(self.timeout, self.proc.kill)  # a hang fails, not blocks
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            self.log.seek(0)
            raise AssertionError(f"driver died: {self.log.read()[-3000:]}")
        return json.loads(line)

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_cases(cases: list[tuple[list[str], dict[str, str]]], timeout: float = 300) -> list[dict]:
    """Every case in one driver process, in order."""
    with Driver(timeout) as d:
        return [d.run(args, env) for args, env in cases]


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fssdp: error: "), lines[0]
    return lines[0]
