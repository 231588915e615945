"""simulate.png: validation (predicted vs measured), the paper's setting, scaling to 1024 GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    _validation(axes[0], report.get("validation") or {})
    _hecate(axes[1], report["hecate"], report["paper_speedup_over_ep"])
    _scaling(axes[2], report["scaling"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _validation(ax: Any, val: dict[str, Any]) -> None:
    pts = []
    for world, v in val.items():
        for key, row in (v.get("cases") or {}).items() if isinstance(v, dict) else []:
            if row.get("measured_s"):
                pts.append((row["measured_s"], row["predicted_s"], f"w{world} {key}"))
    if not pts:
        ax.text(0.5, 0.5, "no measured runs", ha="center")
        return
    for m, p, label in pts:
        ax.scatter(m, p, s=18)
        ax.annotate(label, (m, p), fontsize=6)
    hi = max(max(m, p) for m, p, _ in pts) * 1.1
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    ax.set_xlabel("measured step (s, CPU)")
    ax.set_ylabel("predicted step (s)")
    ax.set_title("validation: calibrated on balanced EP, others predicted")


def _hecate(ax: Any, hec: dict[str, Any], paper: tuple[float, float]) -> None:
    keys = sorted(hec)
    systems = ("fssdp", "fssdp_predict", "fssdp_calibrate", "fastermoe")
    width = 0.8 / len(systems)
    for i, sys_ in enumerate(systems):
        vals = [hec[k]["speedup_over_ep"].get(sys_, 0.0) for k in keys]
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, vals, width, label=sys_)
    ax.axhspan(paper[0], paper[1], color="grey", alpha=0.2, label="paper: Hecate over EP")
    ax.axhline(1.0, c="k", lw=0.8)
    ax.set_xticks(range(len(keys)), [_short(k) for k in keys], fontsize=6, rotation=90)
    ax.set_ylabel("predicted speedup over EP")
    ax.set_title("Hecate's setting (64 experts, top-2)")
    ax.legend(fontsize=7)


def _short(key: str) -> str:
    """'skewed/a100/gpt_moe_s/w16' -> 'skewed A100 S 16'."""
    routing, kind, model, world = key.split("/")
    return f"{routing} {kind.upper()} {model[-1].upper()} {world[1:]}"


def _scaling(ax: Any, scaling: dict[str, Any]) -> None:
    for key in ("skewed/a100/gpt_moe_s/e64",):
        rows = scaling.get(key) or {}
        worlds = sorted(int(w) for w in rows)
        if not worlds:
            continue
        style = "-" if key.startswith("skewed") else ":"
        for sys_ in rows[str(worlds[0])]:
            ax.plot(
                worlds,
                [rows[str(w)][sys_] for w in worlds],
                style,
                marker="o",
                ms=3,
                label=f"{sys_} ({key.split('/')[0]})",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (8 per A100 node)")
    ax.set_ylabel("predicted step (s), GPT-MoE-S")
    ax.set_title("scaling, skewed trace (weak: 8×1024 tokens per GPU)")
    ax.legend(fontsize=6, ncol=2)
