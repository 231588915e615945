"""The simulator's setups: CPU calibration from measured runs, and the Hecate paper's clusters.

[Note: calibration]
From the balanced-routing EP run of `perf.compare` at one world size (its median phase times):
expert FLOP rate = expert rows × 12·d·h / `expert` phase; dense FLOP rate = dense FLOPs /
(`forward` + `backward` + `router`); link bandwidth = the point-to-point bandwidth that
perf.bench_collectives measured on this machine (bench_collectives.json), and the per-collective
latency = what the all-to-alls (`dispatch` + `combine`, 4 per layer) took beyond their bytes at
that bandwidth (counts all-gather, token assignment, waiting: the fixed cost of a call);
optimizer time per parameter from `optimizer`; what the model leaves unexplained in that run's
step becomes a per-step overhead, the same for every system. Nothing from the other runs is
used: they are predicted.

[Note: Hecate setting]
GPT-MoE-S / -L (d 768 / 1536, 12 layers, 64 experts, top-2, expert hidden 2d, vocab 50257),
fp16 (2-byte activations, parameters and gradients on the wire). Assumed, as the paper's exact
batch is not restated here: sequence 1024, 8 sequences per GPU. Devices run at 40% of their fp16
peak (V100 125 TFLOP/s, A100 312). NVLink as given (300 / 600 GB/s per GPU), one NIC per
8-GPU node (100 / 400 Gb/s), 20 µs per collective, Adam at ~40 bytes of memory traffic per
parameter (V100 900 GB/s, A100 2 TB/s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perf.cost_model import GB, Cluster, Workload, attn_fwd_s, head_fwd_s

EFFICIENCY = 0.4

CLUSTERS = {
    "v100": dict(flops=125e12, intra_bw=300 * GB, inter_bw=100e9 / 8, hbm=900 * GB),
    "a100": dict(flops=312e12, intra_bw=600 * GB, inter_bw=400e9 / 8, hbm=2000 * GB),
}

MODELS = {
    "gpt_moe_s": dict(d_model=768, n_layers=12, expert_hidden=1536),
    "gpt_moe_l": dict(d_model=1536, n_layers=12, expert_hidden=3072),
}


def gpu_cluster(kind: str, world: int) -> Cluster:
    spec = CLUSTERS[kind]
    per_node = min(8, world)
    return Cluster(
        name=kind,
        nodes=max(1, world // 8),
        per_node=per_node,
        flops=spec["flops"] * EFFICIENCY,
        expert_flops=spec["flops"] * EFFICIENCY,
        intra_bw=spec["intra_bw"],
        inter_bw=spec["inter_bw"],
        latency_s=20e-6,
        opt_s_per_param=40 / spec["hbm"],
    )


def gpu_workload(
    model: str, seqs_per_gpu: int = 8, seq_len: int = 1024, num_experts: int = 64
) -> Workload:
    return Workload(
        **MODELS[model],
        seq_len=seq_len,
        tokens_per_rank=seqs_per_gpu * seq_len,
        num_experts=num_experts,
        top_k=2,
        vocab=50257,
    )


def _seqs_per_rank(settings: dict[str, Any], world: int) -> int:
    """Sequences per rank of a compare.json run (older files give the global batch)."""
    if "batch_per_rank" in settings:
        return settings["batch_per_rank"]
    return settings["global_batch"] // world


def cpu_workload(settings: dict[str, Any], world: int, num_experts: int = 16) -> Workload:
    """gpt_moe_bench as `perf.compare` ran it (fp32 on the wire)."""
    return Workload(
        d_model=256,
        n_layers=8,
        seq_len=settings["seq_len"],
        tokens_per_rank=_seqs_per_rank(settings, world) * settings["seq_len"],
        num_experts=num_experts,
        top_k=2,
        expert_hidden=512,
        vocab=256,
        act_bytes=4,
        param_bytes=4,
        grad_bytes=4,
    )


def _phase(case: dict[str, Any], *names: str) -> float:
    ph = case.get("phase_time_s") or {}
    return sum(ph.get(n, {}).get("mean", 0.0) for n in names)


def bench_bandwidth(path: Path, world: int) -> float | None:
    """Point-to-point bandwidth (bytes/s) measured by perf.bench_collectives at `world`."""
    if not path.exists():
        return None
    for row in json.loads(path.read_text()).get("calibration", []):
        if row.get("W") == world and row.get("bandwidth_GBps"):
            return float(row["bandwidth_GBps"]) * GB
    return None


def calibrate(
    balanced: dict[str, Any], w: Workload, world: int, bandwidth: float | None = None
) -> Cluster:
    """CPU cluster of `world` ranks fitted to one balanced EP run ([Note: calibration])."""
    if "phase_time_s" not in balanced:
        raise ValueError("the balanced EP case has no phase times: rerun perf.compare")
    unit = Cluster("cpu", 1, world, 1.0, 1.0, 1.0, 1.0)
    expert_t = _phase(balanced, "expert")
    dense_t = _phase(balanced, "forward", "backward", "router")
    a2a_t = _phase(balanced, "dispatch", "combine")
    calls = 4 * w.n_layers  # out and back, forward and backward, per layer
    per_call = (balanced["comm_bytes"].get("a2a") or 0) / world / calls  # bytes per rank
    bw = bandwidth or (per_call * calls / a2a_t if a2a_t > 0 and per_call else 1 * GB)
    flops = w.n_layers * 3 * attn_fwd_s(w, unit) + 3 * head_fwd_s(w, unit)
    params = w.n_layers * (w.dense_params_per_layer + w.num_experts * w.expert_params)
    return Cluster(
        name=f"cpu-w{world}",
        nodes=1,
        per_node=world,
        flops=flops / dense_t,
        expert_flops=w.n_layers * w.rows_per_rank * 12 * w.d_model * w.expert_hidden / expert_t,
        intra_bw=bw,
        inter_bw=bw,
        latency_s=max(0.0, a2a_t / calls - per_call / bw),
        opt_s_per_param=_phase(balanced, "optimizer") / ((params + w.embed_params) / world),
    )
