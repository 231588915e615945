"""Bad input: one line `fssdp: error: …` naming the problem and the fix, exit code 2, and nothing
already saved is changed (an existing run's files are hashed before and after).

Cases that fail before training run in one driver process that calls `launch.train.main` once per
case (the same function `python -m launch.train` runs; `fail()` exits with SystemExit(2)), which
saves a torch import per case. Corrupt checkpoints and a NaN loss run as real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import ENV, python_train, read_metrics

SMALL = [
    "model=gpt_moe_tiny",
    "model.n_layers=2",
    "parallel=none",
    "data=synthetic",
    "train.global_batch_size=4",
    "train.seq_len=32",
    "train.log_every=1",
    "train.progress=false",
    "data.val_batches=1",
]
WORLD2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}

# (overrides, extra environment, text the line must contain); run against an existing run dir.
EARLY: list[tuple[list[str], dict[str, str], str]] = [
    (["model=does_not_exist"], {}, "unknown model 'does_not_exist'"),
    (["parallel=bogus"], {}, "unknown parallel 'bogus'"),
    (["train.steps"], {}, "malformed override"),
    (["train.steps=abc"], {}, "bad override"),
    (["model.no_such_key=1"], {}, "bad override"),
    (["data=tokens"], {}, "data.path is not set"),
    (["data=tokens", "data.path=/no/such/train.bin"], {}, "'/no/such/train.bin' does not exist"),
    (["train.dtype=int8"], {}, "train.dtype"),
    (["train.seq_len=100000"], {}, "exceeds model.max_seq_len"),
    (["model.top_k=9"], {}, "top_k=9 must be in [1, num_experts=8]"),
    (["train.resume=maybe"], {}, "train.resume='maybe': use auto, true or false"),
    (["train.resume=false"], {}, "already holds checkpoints (latest: step 2)"),
    (["parallel.timeout_s=0"], {}, "parallel.timeout_s=0"),
    # A config the world cannot host fails before the rendezvous (no other rank is started).
    (["train.global_batch_size=3"], WORLD2, "does not split evenly over 2 ranks"),
    (["parallel.ranks_per_node=3", "parallel=ddp"], WORLD2, "does not divide the world size 2"),
    (["parallel=none"], WORLD2, "parallel=none runs on one process"),
]


def drive() -> None:
    """Driver process: run each case of stdin's JSON through launch.train.main."""
    import contextlib
    import io

    from launch.train import main

    results = []
    for args, env in json.load(sys.stdin):
        saved = dict(os.environ)
        os.environ.update(env)
        err, out = io.StringIO(), io.StringIO()
        code: object = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(args)
            except SystemExit as e:
                code = e.code
        os.environ.clear()
        os.environ.update(saved)
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    json.dump(results, sys.__stdout__)


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return python_train([*SMALL, *args], timeout=180)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fssdp: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def existing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("bad") / "existing"
    p = _train(["train.steps=2", "train.ckpt_every=1", "train.keep_last=0", f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def test_early_failures_are_one_line_exit_2_and_touch_nothing(existing: Path) -> None:
    before = _hashes(existing)
    cases = [([*SMALL, *args, f"hydra.run.dir={existing}"], env) for args, env, _ in EARLY]
    cmd = [sys.executable, "-c", "from tests.e2e.test_bad_input import drive; drive()"]
    p = subprocess.run(
        cmd, input=json.dumps(cases), env=ENV, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for (args, _env, want), got in zip(EARLY, json.loads(p.stdout)):
        assert got["code"] == 2, (args, got)
        line = _one_line(got["stderr"])
        assert want in line, (args, line)
    assert _hashes(existing) == before


def test_corrupt_checkpoint_is_named_and_fallback_resumes_from_the_previous(
    existing: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(existing, run)
    data = next((run / "checkpoints" / "step_00000002").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])  # truncated by a full disk, say
    before = _hashes(run)
    p = _train(["train.steps=3", f"hydra.run.dir={run}"])
    assert p.returncode == 2, p.stderr[-3000:]
    line = _one_line(p.stderr)
    assert "step_00000002 is truncated or corrupt" in line and "train.resume_fallback=true" in line
    assert _hashes(run) == before

    p = _train(["train.steps=3", "train.resume_fallback=true", f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 1" in p.stdout
    assert "moved to" in p.stderr and "step_00000002.corrupt" in p.stderr
    kept = run / "checkpoints" / "step_00000002.corrupt"
    assert _hashes(kept) == {k.split("/", 2)[2]: v for k, v in before.items() if "02/" in k}
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    want = {r["step"]: r["loss"] for r in read_metrics(existing)}
    assert read_metrics(run)[1]["loss"] == pytest.approx(want[2], rel=1e-6)


def test_nan_loss_stops_naming_the_step_and_saves_nothing_from_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = _train(["train.steps=4", "train.ckpt_every=1", "optim.lr=1e30", f"hydra.run.dir={run}"])
    assert p.returncode == 2, p.stderr[-3000:]
    line = _one_line(p.stderr)
    assert "at step 2" in line and "no checkpoint was written" in line, line
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert [r["step"] for r in read_metrics(run)] == [1]
