"""Expert-bank throughput against one dense matmul chain of the same FLOPs.

`python -m perf.bench_expert_bank [--quick]` on the best device present (CUDA: bfloat16 and the
grouped-GEMM path; CPU: float32 and the per-expert loop), for balanced and Zipf-skewed token
counts. Efficiency = dense time / bank time for the same rows and FLOPs (target on an H100:
≥ 0.7). Writes `perf/results/bench_expert_bank_<device>.json` with the device name.

Legend: N rows, D model width, H expert hidden width, E experts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.common.experts import MLPExperts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:  # noqa: ANN001
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_ids(N: int, E: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """N expert ids with Zipf(skew) frequencies (skew 0 = balanced round-robin)."""
    if skew == 0:
        return torch.arange(N) % E
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** skew
    return torch.multinomial(p / p.sum(), N, replacement=True, generator=gen)


def measure(
    N: int,
    D: int,
    H: int,
    E: int,
    skew: float,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    bank = MLPExperts(E, D, H, activation="gelu", bias=False).to(device=device, dtype=dtype)
    x_ND = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype)
    e_N = expert_ids(N, E, skew, gen).to(device)
    w_in, w_out = bank.w_in[0].detach().clone(), bank.w_out[0].detach().clone()
    with torch.no_grad():
        t_bank = _time(lambda: bank(x_ND, e_N), device, repeats)
        t_dense = _time(lambda: F.gelu(x_ND @ w_in) @ w_out, device, repeats)
    flops = 4 * N * D * H
    counts = torch.bincount(e_N.cpu(), minlength=E).double()
    return {
        "skew": skew,
        "bank_s": t_bank,
        "dense_s": t_dense,
        "efficiency": t_dense / t_bank,
        "bank_tflops": flops / t_bank / 1e12,
        "load_max_over_mean": float(counts.max() / counts.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        shape = dict(N=32768, D=2048, H=4096, E=64)
    else:
        shape = (
            dict(N=4096, D=256, H=512, E=16) if not args.quick else dict(N=1024, D=128, H=256, E=8)
        )
    repeats = 3 if args.quick else 10
    rows = [
        measure(**shape, skew=s, device=device, dtype=dtype, repeats=repeats)
        for s in (0.0, 1.0, 2.0)
    ]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    out = {
        "device": name,
        "dtype": str(dtype),
        "shape": shape,
        "grouped_mm": bool(cuda and hasattr(torch, "_grouped_mm")),
        "results": rows,
    }
    path = Path("perf/results") / f"bench_expert_bank_{'cuda' if cuda else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(
            f"skew {r['skew']}: efficiency {r['efficiency']:.2f} "
            f"({r['bank_tflops']:.3f} TFLOP/s, load max/mean {r['load_max_over_mean']:.2f})"
        )
    print(f"wrote {path} ({name})")


if __name__ == "__main__":
    main()
