"""compare.png: tokens/s per system (natural and skewed routing) and bytes moved per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEM_ORDER = ("fssdp", "fssdp_gated", "fssdp_predict", "ep", "deepspeed", "fsdp", "ddp")
COLLECTIVES = ("a2a", "spag", "sprs", "dense")


def _panels(report: dict[str, Any]) -> list[tuple[str, int]]:
    s = report["settings"]
    return [(m, w) for m in s["models"] for w in s["worlds"]]


def _get(report: dict[str, Any], model: str, world: int, system: str, routing: str) -> dict:
    return report["cases"].get(f"{model}/w{world}/{system}/{routing}") or {}


def _systems(report: dict[str, Any], model: str, world: int) -> list[str]:
    """The systems that ran in this panel (DeepSpeed and fssdp_predict: GPT-MoE only)."""
    return [
        s
        for s in SYSTEM_ORDER
        if any(_get(report, model, world, s, r) for r in ("natural", "skewed"))
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(report)
    fig, axes = plt.subplots(
        2, len(panels), figsize=(max(6.5, 4.2 * len(panels)), 7.5), squeeze=False
    )
    for col, (model, world) in enumerate(panels):
        _throughput(axes[0][col], report, model, world)
        _bytes(axes[1][col], report, model, world)
    fig.suptitle(
        "tokens/s (median step; straggler ratio in the table) — CPU, gloo, 1 thread per rank",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(ax: Any, report: dict, model: str, world: int) -> None:
    width = 0.38
    systems = _systems(report, model, world)
    for i, routing in enumerate(("natural", "skewed")):
        vals = [_get(report, model, world, s, routing).get("tokens_per_s") or 0 for s in systems]
        xs = [j + (i - 0.5) * width for j in range(len(systems))]
        ax.bar(xs, vals, width, label=f"{routing} routing")
    bal = _get(report, model, world, "ep", "balanced").get("tokens_per_s")
    if bal:
        ax.axhline(bal, ls="--", c="k", lw=1, label="ep, balanced routing")
    ax.set_xticks(range(len(systems)), systems, fontsize=7)
    ax.set_title(f"{model}, world {world}")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7)


def _bytes(ax: Any, report: dict, model: str, world: int) -> None:
    systems = _systems(report, model, world)
    bottom = [0.0] * len(systems)
    for coll in COLLECTIVES:
        vals = [
            ((_get(report, model, world, s, "skewed").get("comm_bytes") or {}).get(coll) or 0)
            / 2**20
            for s in systems
        ]
        ax.bar(range(len(systems)), vals, 0.6, bottom=bottom, label=coll)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(systems)), systems, fontsize=7)
    ax.set_ylabel("MiB sent per step, skewed (all ranks)")
    ax.legend(fontsize=7)
