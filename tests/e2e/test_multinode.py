"""Multi-node: two torchrun agents on 127.0.0.1 with c10d rendezvous (2 nodes × 2 ranks).

The planner and dispatcher must see the two nodes (the run prints the topology they use), and the
losses must be the single-process reference's (world-size invariance holds across nodes too).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import free_port
from tests.support.launch import ENV, read_metrics, stop
from tests.support.parity import BASE, train_capture

STEPS = 3
ARGS = [
    *BASE,
    "model=gpt_moe_tiny",
    "model.n_layers=2",
    "data=synthetic",
    "parallel=fssdp",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.progress=false",
    "data.val_batches=0",
]


def _agent(port: int, run: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "fssdp-multinode-test",
        "-m",
        "launch.train",
        *ARGS,
        f"hydra.run.dir={run}",
    ]
    return subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_agents_form_two_nodes_and_match_the_reference(tmp_path: Path) -> None:
    port, run = free_port(), tmp_path / "run"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [_agent(port, run, log) for log in logs]
    try:
        # The reference trains in this process while the agents run.
        ref_args = [a for a in ARGS if a not in BASE and not a.startswith("parallel=")]
        ref = train_capture(0, 1, [*ref_args, "parallel=none"], STEPS)["loss"]
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for a in agents:
            stop(a)
    assert codes == [0, 0], "\n".join(p.read_text()[-3000:] for p in logs)
    out = "".join(p.read_text() for p in logs)
    assert "topology: 2 nodes x 2 ranks per node (world 4; planner and dispatcher)" in out, out
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, want in zip(rows, ref):
        assert len(r["rank_step_time_s"]) == 4
        assert abs(r["loss"] - want) <= 1e-9 * abs(want), (r["step"], r["loss"], want)


@pytest.mark.slow
def test_slurm_script_launches_a_job(tmp_path: Path) -> None:
    """launch/slurm/train.sbatch on one 'node', with srun and scontrol stood in by shims."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(
        '#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    (shims / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    env = {
        **ENV,
        "PATH": f"{shims}:{ENV['PATH']}",
        "SLURM_SUBMIT_DIR": str(root),
        "SLURM_JOB_NODELIST": "node[1]",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "NPROC_PER_NODE": "2",
        "RUN_DIR": str(run),
        "RDZV_PORT": str(free_port()),
    }
    args = [a for a in ARGS if not a.startswith("train.steps=")] + ["train.steps=2"]
    p = subprocess.run(
        ["bash", str(root / "launch/slurm/train.sbatch"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "topology: 1 node x 2 ranks per node" in p.stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
