"""The figures of `python -m launch.report`: each takes the run's metrics records and returns a
matplotlib Figure, or None when the records lack what it needs (older runs, strategies without
that part). No pyplot: figures are built object-oriented, so nothing depends on a display.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fssdp.phases import PHASES

Record = dict[str, Any]

COLORS = {
    "data": "#bdbdbd",
    "forward": "#4c72b0",
    "router": "#e6b800",
    "spag": "#8172b3",
    "dispatch": "#dd8452",
    "expert": "#55a868",
    "combine": "#c44e52",
    "backward": "#64b5cd",
    "sprs": "#da8bc3",
    "wait": "#333333",
    "optimizer": "#937860",
    "plan": "#ff9da7",
    "other": "#e0e0e0",
    "a2a": "#dd8452",
    "dense": "#4c72b0",
}
MIB = 1024.0**2


def color(phase: str) -> str:
    return COLORS.get(phase, "#999999")


def steady(records: list[Record], key: str) -> list[Record]:
    """Records with `key`, without step 1 (warm-up: allocation, first plan) when others exist."""
    have = [r for r in records if r.get(key) is not None]
    later = [r for r in have if r.get("step", 0) > 1]
    return later or have


def gantt(record: Record) -> Figure | None:
    """One step's phases per rank: top-level phases full height, nested ones narrower on top."""
    spans = record.get("phase_spans")
    if not spans:
        return None
    world = len(spans)
    fig = Figure(figsize=(12, max(3.4, 1.2 + 0.55 * world)))
    ax = fig.add_subplot()
    seen: set[str] = set()
    heights = (0.8, 0.5, 0.28, 0.16)
    for rank, rank_spans in enumerate(spans):
        for span in sorted(rank_spans, key=lambda s: s[3] if len(s) > 3 else 0):
            name, start, end = span[0], float(span[1]), float(span[2])
            depth = min(int(span[3]) if len(span) > 3 else 0, len(heights) - 1)
            h = heights[depth]
            ax.broken_barh(
                [(start * 1e3, max(end - start, 0.0) * 1e3)],
                (rank - h / 2, h),
                facecolors=color(name),
                edgecolor="white" if depth else "none",
                linewidth=0.3,
            )
            seen.add(name)
    ax.set_yticks(range(world), [f"rank {r}" for r in range(world)])
    ax.set_ylim(world - 0.5, -0.5)
    ax.set_xlabel("ms from the rank's step start")
    ax.set_title(
        f"step {record.get('step')}: phases per rank (nested phases drawn narrower on top)"
    )
    order = [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))
    ax.legend(
        handles=[Patch(color=color(p), label=p) for p in order],
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    return fig


def mean_phase_times(records: list[Record]) -> dict[str, list[float]]:
    """Mean seconds per step of each phase on each rank, over the steady records."""
    recs = steady(records, "phase_time_s")
    if not recs:
        return {}
    world = max(len(v) for r in recs for v in r["phase_time_s"].values())
    total: dict[str, np.ndarray] = {}
    for r in recs:
        for phase, per_rank in r["phase_time_s"].items():
            acc = total.setdefault(phase, np.zeros(world))
            acc[: len(per_rank)] += np.asarray(per_rank, dtype=np.float64)
    order = [p for p in PHASES if p in total] + sorted(set(total) - set(PHASES))
    return {p: (total[p] / len(recs)).tolist() for p in order}


def phase_breakdown(records: list[Record]) -> Figure | None:
    """Where each rank's step time goes: mean exclusive seconds per phase, stacked."""
    times = mean_phase_times(records)
    if not times:
        return None
    world = len(next(iter(times.values())))
    fig = Figure(figsize=(12, max(3.4, 1.4 + 0.45 * world)))
    ax = fig.add_subplot()
    left = np.zeros(world)
    for phase, per_rank in times.items():
        v = np.asarray(per_rank) * 1e3
        ax.barh(range(world), v, left=left, color=color(phase), label=phase, height=0.7)
        left += v
    ax.set_yticks(range(world), [f"rank {r}" for r in range(world)])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean over logged steps after the first)")
    ax.set_title("where the step time goes, per rank (exclusive time per phase)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def straggler(records: list[Record]) -> Figure | None:
    """Straggler ratios over time; below, each rank's wait for the slowest (when timed)."""
    steps = [r["step"] for r in records]
    series = {
        "expert time max/mean (straggler_ratio)": [r.get("straggler_ratio") for r in records],
        "step time max/mean": [_max_over_mean(r.get("rank_step_time_s")) for r in records],
        "expert phase (fwd+bwd) max/mean": [
            _max_over_mean((r.get("phase_time_s") or {}).get("expert")) for r in records
        ],
    }
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    waits = [r for r in records if (r.get("phase_time_s") or {}).get("wait")]
    if not series:
        return None
    fig = Figure(figsize=(11, 6.5 if waits else 3.8))
    ax = fig.add_subplot(2 if waits else 1, 1, 1)
    for label, ys in series.items():
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("max / mean over ranks")
    ax.set_title("straggler ratio over time (1 = perfectly balanced)")
    ax.legend(fontsize=8)
    if waits:
        ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
        world = len(waits[0]["phase_time_s"]["wait"])
        for rank in range(world):
            ys = [r["phase_time_s"]["wait"][rank] * 1e3 for r in waits]
            ax2.plot([r["step"] for r in waits], ys, marker=".", label=f"rank {rank}")
        ax2.set_ylabel("ms waiting")
        ax2.set_xlabel("step")
        ax2.set_title("time each rank waits for the slowest before the optimizer (phase wait)")
        if world <= 16:
            ax2.legend(fontsize=7, ncol=min(world, 8))
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def _max_over_mean(values: list[float] | None) -> float | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else None


def comm_bytes(records: list[Record]) -> Figure | None:
    """Bytes sent per step (summed over ranks), one panel per collective: spAG and spRS often
    move the same bytes (replicas out, their gradients back), and on one axis one hides the
    other; dense and a2a differ by orders of magnitude."""
    recs = [r for r in records if r.get("comm_bytes")]
    keys = sorted({k for r in recs for k, v in r["comm_bytes"].items() if v})
    if not keys:
        return None
    fig = Figure(figsize=(11, 1.2 + 1.5 * len(keys)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    steps = [r["step"] for r in recs]
    for ax, k in zip(axes, keys):
        ys = [r["comm_bytes"].get(k, 0) / MIB for r in recs]
        ax.plot(steps, ys, marker="o", ms=3, color=color(k) if k in COLORS else None)
        ax.set_ylabel(f"{k}\nMiB", fontsize=8)
        ax.set_ylim(0, 1.15 * max(ys) if max(ys) > 0 else 1.0)
    axes[-1].set_xlabel("step")
    axes[0].set_title("communication volume by collective (MiB per step, all ranks)")
    fig.tight_layout()
    return fig


def training_curves(records: list[Record]) -> Figure | None:
    """Loss (and validation loss), learning rate and gradient norm over the logged steps."""
    series = [
        ("loss", ["loss", "val_loss"], "loss (nats/token)"),
        ("learning rate", ["lr"], "lr"),
        ("gradient norm (before clipping)", ["grad_norm"], "global norm"),
    ]
    panels = [(t, [k for k in ks if any(r.get(k) is not None for r in records)], y)
              for t, ks, y in series]  # fmt: skip
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys, ylabel) in zip(axes, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if k == "val_loss"
                    else None, ms=4, label=k)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def memory(records: list[Record]) -> Figure | None:
    """Model state and peak RSS per rank (last record that has them)."""
    rec = next((r for r in reversed(records) if r.get("model_state_bytes")), None)
    if rec is None:
        return None
    state = np.asarray(rec["model_state_bytes"], dtype=np.float64) / MIB
    rss = np.asarray(rec.get("peak_rss_bytes") or [np.nan] * len(state), dtype=np.float64) / MIB
    x = np.arange(len(state))
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    axes[0].bar(x, state, color="#4c72b0")
    axes[0].set_title("model state (params + grads + optimizer state)")
    axes[1].bar(x, rss, color="#dd8452")
    axes[1].set_title("peak resident memory (RSS)")
    for ax in axes:
        ax.set_xticks(x, [f"rank {r}" for r in x], fontsize=8)
        ax.set_ylabel("MiB")
    fig.suptitle(f"memory per rank at step {rec.get('step')}")
    fig.tight_layout()
    return fig
