"""The DeepSpeed-MoE baseline's install: the `bench` extra, pinned, after torch.

`python -m perf.compare` needs `deepspeed` for its DeepSpeed cases. Without it, the run stops
before any case with one line saying how to get it, unless asked to install it
(`--install-deepspeed`: pip installs the pinned version into this interpreter; torch is already
pinned and installed, so pip keeps it) or to leave the baseline out (`--no-deepspeed`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

PIN = "deepspeed==0.19.8"  # the version perf/results/compare.json was measured with
HOW = (
    f"perf.compare: DeepSpeed is not installed: run `pip install -e '.[bench]'` (pins {PIN}), "
    "or pass --install-deepspeed to install it now, or --no-deepspeed to leave its cases out"
)


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def install() -> None:
    """pip-install the pinned DeepSpeed into this interpreter (its CPU build needs no CUDA)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", PIN], check=True)


def ensure(wanted: bool, install_now: bool) -> None:
    """Exit 2 with one line when DeepSpeed cases are wanted and DeepSpeed is missing."""
    if not wanted or available():
        return
    if install_now:
        install()
        return
    print(HOW, file=sys.stderr)
    raise SystemExit(2)
