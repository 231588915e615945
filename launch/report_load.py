"""Expert-load figures with expert ids and owning ranks, for `launch.report` and tensorboard.

Owners come from the `owners` key of metrics.jsonl (ep, fssdp: owning rank per expert per bank,
logged at the first record and whenever re-sharding changes them). Runs from before that key:
EP's layout is derived (contiguous blocks, `fssdp.sharding.contiguous_sharding`), fssdp's is
unknown (re-sharding moves it). Strategies that hold every expert everywhere (none, ddp, fsdp)
have no owner.

Load is shown as tokens / the bank's mean on a logarithmic, diverging scale centred on 1
(white = the mean, red = hotter, blue = colder, black = no tokens, grey = no such expert): a
linear scale from 0 to the hottest expert turns everything else dark as soon as one expert is
10x the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure

Record = dict[str, Any]
Owners = dict[str, list[int]]


def owners_per_record(records: list[Record], strategy: str | None) -> list[Owners | None]:
    """The owners in effect at each record (the latest logged at or before it)."""
    out: list[Owners | None] = []
    current: Owners | None = None
    for r in records:
        current = r.get("owners") or current
        if current is None and strategy == "ep" and r.get("expert_load"):
            current = _ep_layout(r)
        out.append(current)
    return out


def _ep_layout(record: Record) -> Owners:
    from fssdp.sharding import contiguous_sharding

    world = len(record.get("rank_step_time_s") or [1])
    return {b: contiguous_sharding(len(c), world) for b, c in record["expert_load"].items()}


def load_scale(values: np.ndarray) -> colors.Normalize:
    """Log scale centred on 1, symmetric, wide enough for the 98th percentile of the ratios
    (clamped to [2, 64]); outliers beyond it saturate, the typical cell does not."""
    v = values[np.isfinite(values) & (values > 1e-9)]
    spread = np.maximum(v, 1.0 / v) if v.size else np.array([2.0])
    c = float(np.clip(np.quantile(spread, 0.98), 2.0, 64.0))
    return colors.LogNorm(vmin=1.0 / c, vmax=c)


def _cmap(kind: str) -> colors.Colormap:
    from matplotlib import colormaps

    # black: no tokens; grey: an expert the bank does not have (banks of different sizes)
    return colormaps["RdBu_r" if kind == "load" else "viridis"].with_extremes(
        bad="#c8c8c8", under="black"
    )


def _ratio_grid(rows: dict[str, list[int]], kind: str) -> np.ndarray:
    width = max(len(v) for v in rows.values())
    grid = np.full((len(rows), width), np.nan)
    for i, v in enumerate(rows.values()):
        a = np.asarray(v, dtype=np.float64)
        mean = a.mean() if a.size else 0.0
        grid[i, : len(a)] = (a / mean if mean > 0 else a) if kind == "load" else a
    if kind == "load":  # no tokens: below the scale (black); no such expert: nan (grey)
        grid[grid <= 0] = 1e-12
    return grid


def step_heatmap(
    rows: dict[str, list[int]], owners: Owners | None, kind: str, step: int
) -> Figure:
    """One step, banks × expert ids (tensorboard): load as tokens / bank mean (log scale) or
    replicas per expert; each cell names its owning rank when the grid is small enough."""
    grid = _ratio_grid(rows, kind)
    n_banks, width = grid.shape
    fig = Figure(figsize=(min(3 + 0.35 * width, 14), min(1.6 + 0.38 * n_banks, 10)), dpi=72)
    ax = fig.add_subplot()
    norm = load_scale(grid) if kind == "load" else colors.Normalize(0, max(1, np.nanmax(grid)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=_cmap(kind), norm=norm)
    _expert_ticks(ax, width)
    ax.set_yticks(range(n_banks), [_short(b) for b in rows], fontsize=7)
    ax.set_xlabel("expert id" + (" (cell text: owning rank)" if owners else ""))
    what = "tokens / bank mean" if kind == "load" else "replicas (holders besides the owner)"
    ax.set_title(f"step {step}: {what}", fontsize=9)
    if owners and grid.size <= 600:
        for i, bank in enumerate(rows):
            for e, r in enumerate(owners.get(bank, [])):
                ax.text(e, i, str(r), ha="center", va="center", fontsize=6, color="#555555")
    fig.colorbar(im, ax=ax, label=what)
    fig.tight_layout()
    return fig


def _expert_ticks(ax: Any, width: int) -> None:
    step = max(1, int(np.ceil(width / 32)))
    ticks = list(range(0, width, step))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)


def _short(bank: str) -> str:
    return bank.removesuffix(".experts") if len(bank) > 14 else bank


def heatmap_over_time(
    records: list[Record], key: str, owners: list[Owners | None], title: str
) -> Figure | None:
    """Banks stacked (rows: each bank's experts, labelled `bank e<id> r<owner>`) × logged
    steps; `expert_load` as tokens / bank mean (log scale), `replicas` as counts."""
    keep = [(r, o) for r, o in zip(records, owners) if r.get(key)]
    if not keep:
        return None
    banks = list(keep[-1][0][key])
    sizes = [len(keep[-1][0][key][b]) for b in banks]
    kind = "load" if key == "expert_load" else "replicas"
    grid = np.full((sum(sizes), len(keep)), np.nan)
    for j, (r, _) in enumerate(keep):
        col = _ratio_grid({b: r[key].get(b, [0] * n)[:n] for b, n in zip(banks, sizes)}, kind)
        grid[:, j] = np.concatenate([col[i, :n] for i, n in enumerate(sizes)])
    fig = Figure(figsize=(11, min(2.8 + 0.11 * grid.shape[0], 16)))
    ax = fig.add_subplot()
    norm = load_scale(grid) if kind == "load" else colors.Normalize(0, max(1, np.nanmax(grid)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=_cmap(kind), norm=norm)
    for edge in np.cumsum(sizes)[:-1] - 0.5:
        ax.axhline(edge, color="gold", lw=1.0)
    last_owner = keep[-1][1]
    _row_labels(ax, banks, sizes, last_owner)
    ticks = np.unique(np.linspace(0, len(keep) - 1, min(len(keep), 12)).round().astype(int))
    ax.set_xticks(ticks, [str(keep[t][0]["step"]) for t in ticks])
    ax.set_xlabel("step (logged steps)")
    ax.set_ylabel("bank, expert id, owning rank" if last_owner else "bank, expert id")
    ax.set_title(title + ("" if last_owner else " (every rank holds every expert)"))
    cbar = "tokens / bank mean (log scale; black: none)" if kind == "load" else "replicas"
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    return fig


def _row_labels(ax: Any, banks: list[str], sizes: list[int], owners: Owners | None) -> None:
    """Every row labelled when there are few; else every k-th, so the labels stay readable."""
    every = max(1, int(np.ceil(sum(sizes) / 64)))
    ticks, labels, row = [], [], 0
    for b, n in zip(banks, sizes):
        own = (owners or {}).get(b)
        for e in range(n):
            if e % every == 0:
                ticks.append(row + e)
                who = f" r{own[e]}" if own and e < len(own) else ""
                labels.append((f"{_short(b)} " if e == 0 else "") + f"e{e}{who}")
        row += n
    ax.set_yticks(ticks, labels, fontsize=6 if len(ticks) > 32 else 7)


def rank_load(records: list[Record], owners: list[Owners | None]) -> Figure | None:
    """Tokens routed to the experts each rank owns, / the mean over ranks, all banks: the hot
    rank is the one above 1 (under EP it computes all of them; FSSDP spreads them)."""
    pts: dict[int, list[tuple[int, float]]] = {}
    for r, own in zip(records, owners):
        load = r.get("expert_load")
        if not load or not own:
            continue
        world = max(max(o, default=0) for o in own.values()) + 1
        world = max(world, len(r.get("rank_step_time_s") or []))
        per = np.zeros(world)
        for bank, counts in load.items():
            o = own.get(bank)
            if o is not None and len(o) == len(counts):
                np.add.at(per, np.asarray(o), np.asarray(counts, dtype=np.float64))
        if per.mean() > 0:
            for rank, v in enumerate(per / per.mean()):
                pts.setdefault(rank, []).append((r["step"], float(v)))
    if not pts:
        return None
    fig = Figure(figsize=(11, 3.6))
    ax = fig.add_subplot()
    for rank, xy in sorted(pts.items()):
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", ms=3, label=f"rank {rank}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens to owned experts / mean")
    ax.set_title("load per owning rank (tokens routed to the experts each rank owns)")
    if len(pts) <= 16:
        ax.legend(fontsize=7, ncol=min(len(pts), 8))
    fig.tight_layout()
    return fig
