"""Data layer across processes: the split and the batches are the same in a fresh interpreter
(no dependence on hash seeds or process state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from launch.data import (
    DataConfig,
    GlobalBatchSampler,
    build_streams,
    pystdlib_files,
)

B, S = 8, 16



def test_split_and_batches_stable_across_processes() -> None:
    # A salted builtin hash() anywhere in the split or the seeding would differ between processes.
    code = (
        "import json, torch; from launch.data import *; t, v = build_streams(DataConfig());"
        "s = GlobalBatchSampler(t, 3, 4, 32, 1, 2);"
        "print(json.dumps([pystdlib_files()[1], s.batch_at(5)[0].tolist()]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    train, _ = build_streams(DataConfig())
    here = [pystdlib_files()[1], GlobalBatchSampler(train, 3, 4, 32, 1, 2).batch_at(5)[0].tolist()]
    assert json.loads(out.stdout) == here


