"""`python -m launch.report <run dir> [--step N]`: a run's profile in pictures and one screen.

Writes `<run>/report.html` (self-contained: the PNGs are inlined; a jinja2 template) and the PNGs
themselves under `<run>/report/`: loss / learning rate / gradient norm, one step's per-rank phase
Gantt chart, where the step time goes per rank, straggler ratio over time, communication bytes by
collective, expert load over time (labelled with expert ids and owning ranks), the load per owning
rank, replicas per expert over time (fssdp), memory per rank, and the run's config. Prints a
summary: where the time goes by phase, straggler ratio, bytes per step by collective, load
imbalance, memory.
Runs whose metrics lack some keys (older runs, strategies without that part) get what they have;
the page says what is missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from launch import report_figures as rf
from launch.errors import UserError, fail
from launch.summary import _fmt_bytes

Record = dict[str, Any]


def load_records(run_dir: Path) -> list[Record]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a run directory (hydra.run.dir of a run)")
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # the last line of a run killed while writing it
                break
            raise UserError(f"{path} line {i} is not JSON ({e.msg}): repair or remove it") from e
    if not records:
        raise UserError(f"{path} has no records yet: run at least one logged step")
    return records


def run_config(run_dir: Path) -> Any:
    """The run's config.yaml (an OmegaConf node), or None for a run directory without one."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def run_info(run_dir: Path, records: list[Record]) -> str:
    """E.g. "model gpt_moe, parallel fssdp, world 2, 30 steps" (config.yaml and the records)."""
    from omegaconf import OmegaConf

    parts = []
    cfg = run_config(run_dir)
    if cfg is not None:
        parts.append(f"model {OmegaConf.select(cfg, 'model.family', default='?')}")
        parts.append(f"parallel {OmegaConf.select(cfg, 'parallel.strategy', default='?')}")
    world = len(records[-1].get("rank_step_time_s") or [0])
    parts += [f"world {world}", f"{records[-1].get('step')} steps, {len(records)} logged"]
    return ", ".join(parts)


def pick_step(records: list[Record], step: int | None) -> Record | None:
    with_spans = [r for r in records if r.get("phase_spans")]
    if step is not None:
        found = [r for r in with_spans if r.get("step") == step]
        if not found:
            have = ", ".join(str(r.get("step")) for r in with_spans) or "none"
            raise UserError(f"--step {step} has no phase spans; steps that do: {have}")
        return found[0]
    steady = rf.steady(with_spans, "phase_spans")
    return steady[-1] if steady else None


def build_figures(
    records: list[Record], step: int | None, strategy: str | None = None
) -> list[tuple[str, Any, str]]:
    """(title, figure or None, what is missing when None)."""
    from launch import report_load as rl

    chosen = pick_step(records, step)
    owners = rl.owners_per_record(records, strategy)
    return [
        ("Loss, learning rate, gradient norm", rf.training_curves(records), "no loss"),
        (
            f"Phases per rank, step {chosen['step'] if chosen else '?'}",
            rf.gantt(chosen) if chosen else None,
            "no phase_spans in metrics.jsonl (run without train.phase_timing, or an older run)",
        ),
        ("Where the step time goes", rf.phase_breakdown(records), "no phase_time_s"),
        ("Straggler ratio over time", rf.straggler(records), "no per-rank times"),
        ("Communication by collective", rf.comm_bytes(records), "no comm_bytes (or all zero)"),
        (
            "Expert load over time",
            rl.heatmap_over_time(records, "expert_load", owners, "tokens per expert over time"),
            "no expert_load (an older run)",
        ),
        (
            "Load per owning rank",
            rl.rank_load(records, owners),
            "no expert owners: every rank holds every expert (none, ddp, fsdp), or an fssdp run "
            "from before owners were logged",
        ),
        (
            "Replicas per expert over time",
            rl.heatmap_over_time(
                records, "replicas", owners, "replicas per expert of the placement each step used"
            ),
            "no replicas (strategies other than fssdp do not replicate)",
        ),
        ("Memory per rank", rf.memory(records), "no model_state_bytes"),
    ]


def summary_lines(run_dir: Path, records: list[Record]) -> list[str]:
    last = records[-1]
    steady = rf.steady(records, "step_time_s")
    step_s = [r["step_time_s"] for r in steady if r.get("step_time_s")]
    lines = [f"fssdp report: {run_dir}  ({run_info(run_dir, records)})"]
    if step_s:
        tok = last.get("tokens_per_s")
        lines.append(
            f"step time: mean {_mean(step_s):.4f} s over {len(step_s)} logged steps"
            + (" after the first" if len(steady) < len(records) else "")
            + (f"; last {tok:.0f} tokens/s" if tok else "")
        )
    lines += _phase_lines(records, _mean(step_s) if step_s else 0.0)
    lines += _straggler_lines(records)
    lines += _comm_lines(records)
    lines += _load_lines(records)
    lines += _memory_lines(last)
    return lines


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _phase_lines(records: list[Record], step_s: float) -> list[str]:
    times = rf.mean_phase_times(records)
    if not times:
        return ["where the time goes: (no phase_time_s in this run's metrics)"]
    total = sum(_mean(v) for v in times.values()) or 1.0
    out = ["where the time goes (mean per step; exclusive time per phase):"]
    out.append(f"  {'phase':<10} {'mean s':>9} {'max s':>9} {'share':>6}  slowest rank")
    for phase, per_rank in sorted(times.items(), key=lambda kv: -_mean(kv[1])):
        m, mx = _mean(per_rank), max(per_rank)
        if mx <= 0:
            continue
        slow = per_rank.index(mx)
        out.append(f"  {phase:<10} {m:9.4f} {mx:9.4f} {100 * m / total:5.1f}%  {slow}")
    return out


def _straggler_lines(records: list[Record]) -> list[str]:
    ratios = [r["straggler_ratio"] for r in records if r.get("straggler_ratio") is not None]
    out = []
    if ratios:
        out.append(
            f"straggler ratio (max/mean expert time over ranks): mean {_mean(ratios):.2f}, "
            f"max {max(ratios):.2f}, last {ratios[-1]:.2f}"
        )
    waits = [
        _mean(r["phase_time_s"]["wait"])
        for r in rf.steady(records, "phase_time_s")
        if r["phase_time_s"].get("wait")
    ]
    if waits:
        out.append(f"waiting for the slowest rank: mean {_mean(waits):.4f} s per step per rank")
    return out


def _comm_lines(records: list[Record]) -> list[str]:
    recs = [r["comm_bytes"] for r in rf.steady(records, "comm_bytes")]
    keys = sorted({k for c in recs for k, v in c.items() if v})
    if not keys:
        return []
    parts = [f"{k} {_fmt_bytes(_mean([c.get(k, 0) for c in recs]))}" for k in keys]
    return ["bytes per step (all ranks, mean): " + ", ".join(parts)]


def _load_lines(records: list[Record]) -> list[str]:
    imb = [r["expert_load_imbalance"] for r in records if r.get("expert_load_imbalance")]
    out = []
    if imb:
        out.append(
            f"load imbalance (max/mean tokens per expert, mean over banks): mean {_mean(imb):.2f}"
            f", last {imb[-1]:.2f}"
        )
    load = next((r["expert_load"] for r in reversed(records) if r.get("expert_load")), None)
    if load:
        bank, counts = max(load.items(), key=lambda kv: max(kv[1]) / max(1, sum(kv[1])))
        top = max(range(len(counts)), key=counts.__getitem__)
        idle = sum(1 for c in counts if c == 0)
        out.append(
            f"  hottest: {bank} expert {top} takes {100 * counts[top] / max(1, sum(counts)):.0f}%"
            f" of its rows; {idle} of {len(counts)} experts idle"
        )
    return out


def _memory_lines(last: Record) -> list[str]:
    out = []
    for key, label in (("model_state_bytes", "model state"), ("peak_rss_bytes", "peak RSS")):
        v = last.get(key)
        if v:
            out.append(f"{label} per rank: {_fmt_bytes(min(v))} .. {_fmt_bytes(max(v))}")
    return ["memory: " + "; ".join(out)] if out else []


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fssdp report: {{ run_dir }}</title>
<style>body{font-family:sans-serif;max-width:1240px;margin:auto}img{max-width:100%}
pre{background:#f4f4f4;padding:8px;overflow-x:auto}nav a{margin-right:1em}</style></head>
<body><h1>fssdp report</h1>
<nav>{% for s in sections %}<a href="#s{{ loop.index }}">{{ s.title }}</a>{% endfor %}
<a href="#config">Config</a></nav>
<pre>{{ summary }}</pre>
{% for s in sections %}<h2 id="s{{ loop.index }}">{{ s.title }}</h2>
{% if s.png %}<img alt="{{ s.title }}" src="data:image/png;base64,{{ s.png }}">
{% else %}<p><i>{{ s.missing }}</i></p>{% endif %}
{% endfor %}<h2 id="config">Config</h2>
{% if config %}<pre>{{ config }}</pre>{% else %}<p><i>no config.yaml in the run directory</i></p>
{% endif %}</body></html>
"""


def write_report(run_dir: Path, step: int | None = None) -> tuple[Path, list[str]]:
    """Write report.html and the PNGs; return the html path and the summary lines."""
    import jinja2
    from omegaconf import OmegaConf

    records = load_records(run_dir)
    lines = summary_lines(run_dir, records)
    cfg = run_config(run_dir)
    strategy = OmegaConf.select(cfg, "parallel.strategy") if cfg is not None else None
    png_dir = run_dir / "report"
    png_dir.mkdir(exist_ok=True)
    sections = []
    for i, (title, fig, missing) in enumerate(build_figures(records, step, strategy)):
        section = {"title": title, "missing": missing, "png": None}
        if fig is not None:
            png = png_dir / f"{i}_{_slug(title)}.png"
            fig.savefig(png, dpi=110)
            section["png"] = base64.b64encode(png.read_bytes()).decode()
        sections.append(section)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = run_dir / "report.html"
    page.write_text(
        env.from_string(PAGE).render(
            run_dir=str(run_dir),
            summary="\n".join(lines),
            sections=sections,
            config=OmegaConf.to_yaml(cfg) if cfg is not None else None,
        )
    )
    return page, lines


def _slug(title: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in title.lower().split(",")[0])
    return "_".join(p for p in keep.split("_") if p)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory (hydra.run.dir)")
    parser.add_argument("--step", type=int, default=None, help="step of the Gantt chart")
    args = parser.parse_args(argv)
    try:
        if not args.run_dir.is_dir():
            raise UserError(f"{args.run_dir} is not a directory: pass a run directory")
        page, lines = write_report(args.run_dir, args.step)
    except UserError as e:
        fail(str(e))
    print("\n".join(lines))
    print(f"report: {page.resolve()}", file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
