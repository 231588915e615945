"""Bad input: one line `fssdp: error: …` naming the problem and the fix, exit code 2, and nothing
already saved is changed (an existing run's files are hashed before and after).

Every case runs in one driver process (tests/support/driver.py) that calls `launch.train.main`
once per case, which saves a torch import per case: the cases that fail before training, and
the damaged, mismatched or diverged checkpoints, which load a model and train a few steps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.driver import Driver, hashes, one_line
from tests.support.launch import read_metrics
from tests.support.shared import shared

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

# (overrides, extra environment, text the line must contain); `{run}` is an existing run
# (checkpoints at steps 1 and 2), `{file}` a plain file, `{locked}` a run held by a live job.
EARLY: list[tuple[list[str], dict[str, str], str]] = [
    (["model=does_not_exist"], {}, "unknown model 'does_not_exist'"),
    (["parallel=bogus"], {}, "unknown parallel 'bogus'"),
    (["train.steps"], {}, "malformed override"),
    (["train.steps=abc"], {}, "bad override"),
    (["model.no_such_key=1"], {}, "bad override"),
    (["+train.foo=1"], {}, "unknown config key train.foo"),
    (["+model.n_layer=1"], {}, "unknown config key model.n_layer (did you mean model.n_layers?)"),
    (["data=tokens"], {}, "data.path is not set"),
    (["data=tokens", "data.path=/no/such/train.bin"], {}, "'/no/such/train.bin' does not exist"),
    (["data=tokens", "data.path={run}/checkpoints"], {}, "is a directory, not a token file"),
    (["train.dtype=int8"], {}, "train.dtype"),
    (["train.seq_len=100000"], {}, "exceeds model.max_seq_len"),
    (["model.top_k=9"], {}, "model.top_k=9 is not allowed (must be in [1, num_experts])"),
    (["model.n_heads=3"], {}, "model.d_model=64 is not allowed (must be a multiple of n_heads)"),
    (["train.resume=maybe"], {}, "train.resume='maybe' is not allowed (must be auto | true"),
    (["train.resume=false"], {}, "already holds checkpoints (latest: step 2)"),
    (["train.resume_step=7"], {}, "has no checkpoint of that step (saved: 1, 2)"),
    (["train.resume_step=1", "train.resume=false"], {}, "train.resume_step=1 with train.resume"),
    (["parallel.timeout_s=0"], {}, "parallel.timeout_s=0"),
    # Values that used to pass (and train backwards, or crash later): the rule tables.
    (["optim.grad_clip=-1"], {}, "optim.grad_clip=-1.0 is not allowed (must be ≥ 0"),
    (["optim.lr=-1"], {}, "optim.lr=-1.0 is not allowed (must be in (0, 1e+30]"),
    (["optim.lr=nan"], {}, "optim.lr=nan is not allowed"),
    (["optim.lr=1e39"], {}, "optim.lr=1e+39 is not allowed"),
    (["train.log_every=0"], {}, "train.log_every=0 is not allowed (must be ≥ 1"),
    (["parallel.memory_cap=-1"], {}, "parallel.memory_cap=-1 is not allowed (must be ≥ 0"),
    (["model.route_skew=-1"], {}, "model.route_skew=-1.0 is not allowed (must be ≥ 0"),
    # The run directory: a file, under a file, or held by another job.
    (["hydra.run.dir={file}"], {}, "is a file, not a directory: use another path"),
    (["hydra.run.dir={file}/run"], {}, "Not a directory [ENOTDIR]"),
    (["hydra.run.dir={locked}"], {}, f"is in use by host {os.uname().nodename} pid"),
    # A config the world cannot host fails before the rendezvous (no other rank is started).
    (["train.global_batch_size=3"], WORLD2, "does not split evenly over 2 ranks"),
    (["parallel.ranks_per_node=3", "parallel=ddp"], WORLD2, "does not divide the world size 2"),
    (["parallel=none"], WORLD2, "parallel=none runs on one process"),
]


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    with Driver() as d:
        yield d


@pytest.fixture(scope="module")
def existing(tmp_path_factory: pytest.TempPathFactory, driver: Driver) -> Path:
    """A finished run with checkpoints at steps 1 and 2 (once per session: read or copied,
    never changed)."""

    def make(root: Path) -> Path:
        run = root / "existing"
        args = ["train.steps=2", "train.ckpt_every=1", "train.keep_last=0", f"hydra.run.dir={run}"]
        got = driver.run([*SMALL, *args])
        assert got["code"] == 0, got["stderr"][-3000:]
        return run

    return shared(tmp_path_factory, "bad-input-existing", make)


def _locked_copy(existing: Path, where: Path) -> Path:
    """A copy of the run whose lock a live process on this host holds (this test's parent)."""
    from launch import lock

    shutil.copytree(existing, where)
    holder = {"host": os.uname().nodename, "pid": os.getppid(), "job": "someone-else"}
    holder["start"] = lock._start_ticks(os.getppid())  # type: ignore[assignment]
    (where / lock.LOCK_NAME).write_text(json.dumps(holder))
    return where


def test_early_failures_are_one_line_exit_2_and_touch_nothing(
    existing: Path, tmp_path: Path, driver: Driver
) -> None:
    run = tmp_path / "run"  # a copy: the session's `existing` is shared, read by other tests
    shutil.copytree(existing, run)
    places = {"run": run, "file": tmp_path / "a_file", "locked": tmp_path / "locked"}
    places["file"].write_text("not a directory")
    _locked_copy(existing, places["locked"])
    before = {k: hashes(p) for k, p in places.items() if p.is_dir()}
    cases = []
    for args, env, _ in EARLY:
        args = [a.format(**places) for a in args]
        at = (
            []
            if any(a.startswith("hydra.run.dir=") for a in args)
            else [f"hydra.run.dir={run}"]
        )
        cases.append(([*SMALL, *args, *at], env))
    for (args, _env, want), got in zip(EARLY, [driver.run(*c) for c in cases]):
        assert got["code"] == 2, (args, got)
        line = one_line(got["stderr"])
        assert want.format(**places) in line, (args, line)
    assert {k: hashes(p) for k, p in places.items() if p.is_dir()} == before
    assert places["file"].read_text() == "not a directory"


def _corrupt(run: Path, how: str) -> None:
    data = next((run / "checkpoints" / "step_00000002").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    if how == "truncate":  # by a full disk, say
        raw = raw[:1000]
    elif how == "same_size":  # 4 KiB of random bytes inside: only a checksum sees it
        raw[20_000:24_096] = os.urandom(4096)
    else:  # "old_manifest": a checkpoint of an older version (sizes only), bytes overwritten
        manifest = data.parent / "manifest.json"
        manifest.write_text(json.dumps({"files": json.loads(manifest.read_text())["files"]}))
        raw[:512] = os.urandom(512)
    data.write_bytes(bytes(raw))


# (run, overrides, exit code, text in stderr (the one line when the code is 2))
CKPT_CASES: list[tuple[str, list[str], int, str]] = [
    ("truncate", [], 2, "step_00000002 is truncated or corrupt"),
    ("truncate", ["train.resume_fallback=true"], 0, "step_00000002.corrupt"),
    ("same_size", [], 2, "does not match its recorded checksum"),
    ("same_size", ["train.resume_fallback=true"], 0, "step_00000002.corrupt"),
    ("old_manifest", [], 2, "cannot be loaded, it is damaged"),
    ("old_manifest", ["train.resume_fallback=true"], 0, "step_00000002.corrupt"),
    ("shape", ["model.d_model=128"], 2, "in model.d_model (64 → 128)"),
    ("shape", ["model.n_layers=1", "train.resume_fallback=true"], 2, "model.n_layers (2 → 1)"),
    ("rollback", ["train.resume_step=1"], 0, ""),
    # From step 2 with an absurd lr: step 3 is saved with finite but diverged weights, step 4
    # stops; the advice (a lower lr from an earlier checkpoint) then works.
    ("nan", ["optim.lr=1e30", "train.steps=4"], 2, "loss is nan at step 4"),
    ("nan", ["train.resume_step=2", "train.steps=4"], 0, ""),
]


@pytest.fixture(scope="module")
def ckpt_runs(existing: Path, tmp_path_factory: pytest.TempPathFactory, driver: Driver) -> dict:
    """Copies of the run, damaged as named; every case of CKPT_CASES run in one driver (once per
    session: the tests read the runs, never change them)."""
    make = lambda root: _ckpt_runs(existing, root, driver)  # noqa: E731
    return shared(tmp_path_factory, "bad-input-ckpt-runs", make)


def _ckpt_runs(existing: Path, root: Path, driver: Driver) -> dict:
    runs = {name: root / name for name, *_ in CKPT_CASES}
    for name, run in runs.items():
        shutil.copytree(existing, run)
        if name in ("truncate", "same_size", "old_manifest"):
            _corrupt(run, name)
    before = {name: hashes(run) for name, run in runs.items() if run.exists()}
    cases = []
    for name, args, *_ in CKPT_CASES:
        steps = [] if any(a.startswith("train.steps=") for a in args) else ["train.steps=3"]
        cases.append(
            ([*SMALL, *steps, "train.ckpt_every=1", *args, f"hydra.run.dir={runs[name]}"], {})
        )
    return {"runs": runs, "before": before, "results": [driver.run(*c) for c in cases]}


@pytest.mark.parametrize(
    "i", range(len(CKPT_CASES)), ids=[" ".join(c[1]) or c[0] for c in CKPT_CASES]
)
def test_checkpoint_failure_is_one_line_and_recovery_works(ckpt_runs: dict, i: int) -> None:
    name, _args, code, want = CKPT_CASES[i]
    got = ckpt_runs["results"][i]
    assert got["code"] == code, got["stderr"][-3000:]
    if code == 2:
        assert want in one_line(got["stderr"])
    else:
        assert want in got["stderr"]
        assert f"resumed from step {2 if name == 'nan' else 1}" in got["stdout"]


def test_failed_resumes_change_nothing_and_fallback_keeps_the_damaged(
    ckpt_runs: dict, existing: Path
) -> None:
    runs, before = ckpt_runs["runs"], ckpt_runs["before"]
    # Two refused resumes (found while loading, after the model was built): every saved file is
    # unchanged; the only new files are the empty tensorboard event files of those attempts.
    after = hashes(runs["shape"])
    assert {k: after.get(k) for k in before["shape"]} == before["shape"]
    assert all(k.startswith("tensorboard/") for k in after.keys() - before["shape"].keys())
    want = {r["step"]: r["loss"] for r in read_metrics(existing)}
    for name in ("truncate", "same_size", "old_manifest"):
        kept = runs[name] / "checkpoints" / "step_00000002.corrupt"
        was = {k.split("/", 2)[2]: v for k, v in before[name].items() if "02/" in k}
        assert hashes(kept) == was, name
        rows = read_metrics(runs[name])
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert rows[1]["loss"] == pytest.approx(want[2], rel=1e-6)  # step 2 again, from step 1


def test_resume_step_rolls_later_checkpoints_aside(ckpt_runs: dict) -> None:
    run, before = ckpt_runs["runs"]["rollback"], ckpt_runs["before"]["rollback"]
    kept = run / "checkpoints" / "step_00000002.rolled_back"
    assert hashes(kept) == {k.split("/", 2)[2]: v for k, v in before.items() if "02/" in k}
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000002", "step_00000002.rolled_back", "step_00000003"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert (run / "metrics.rolled_back.jsonl").exists()


def test_nan_stop_names_the_step_and_the_fix_and_saves_nothing_from_it(ckpt_runs: dict) -> None:
    stop = one_line(ckpt_runs["results"][9]["stderr"])
    assert "no checkpoint was written" in stop and "lower optim.lr" in stop
    assert "train.resume_step=<step> (saved: 1, 2, 3; the latest may" in stop
    run = ckpt_runs["runs"]["nan"]  # then resumed with train.resume_step=2 and the default lr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [  # step 1 went by train.keep_last=3; the diverged step 3 is kept aside
        "step_00000002",
        "step_00000003",
        "step_00000003.rolled_back",
        "step_00000004",
    ]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
