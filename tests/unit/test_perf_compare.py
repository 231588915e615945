"""perf.compare's cases, command lines and compare.json schema, on a tiny fake run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from perf.balanced_train import balanced_route, round_robin_experts
from perf.compare import build_report, parse
from perf.compare_cases import QUICK, SYSTEMS, Case, cases, command
from perf.compare_stats import summarize
from perf.readme_table import dense_s, window_table

TOKENS = QUICK.tokens(2)


def fake_run(step_s: float, strag: float, steps: int = QUICK.steps) -> list[dict]:
    """metrics.jsonl records of one run whose steps after the warm-up take `step_s`."""
    recs = []
    for s in range(1, steps + 1):
        t = 10.0 if s <= QUICK.warmup else step_s  # warm-up steps are slow and must be dropped
        recs.append(
            {
                "step": s,
                "loss": 5.0 - s * 0.1,
                "tokens_per_s": TOKENS / t,
                "step_time_s": t,
                "rank_step_time_s": [t, t * 0.9],
                "straggler_ratio": strag,
                "comm_bytes": {"a2a": 100, "spag": 10, "sprs": 10, "dense": 5},
                "model_state_bytes": [1000.0, 1000.0],
                "phase_time_s": {"expert": [0.2, 0.1], "forward": [0.3, 0.3]},
            }
        )
    return recs


STEP_S = {
    "fssdp": 1.0,
    "ep": 1.5,
    "fsdp": 2.0,
    "ddp": 1.25,
    "deepspeed": 3.0,
    "fssdp_predict": 0.75,
    "fssdp_gated": 0.9,
}


bal_key = ("gpt_moe_bench", 2, "ep", "balanced")


def test_quick_cases_and_commands(tmp_path) -> None:  # noqa: ANN001
    todo = cases(QUICK)
    assert len(todo) == 9 and Case(*bal_key) in todo
    gated = command(Case("gpt_moe_bench", 2, "fssdp_gated", "skewed"), QUICK, tmp_path)
    assert "parallel=fssdp" in gated and "parallel.cost_aware=true" in gated
    ds = command(Case("gpt_moe_bench", 2, "deepspeed", "skewed"), QUICK, tmp_path)
    assert ds[ds.index("-m") + 1] == "perf.deepspeed_moe"
    assert f"model.route_skew={QUICK.skew}" in ds and not any(a.startswith("parallel=") for a in ds)
    bal = command(Case("gpt_moe_bench", 2, "ep", "balanced"), QUICK, tmp_path)
    assert bal[bal.index("-m") + 1] == "perf.balanced_train" and "parallel=ep" in bal
    assert not any("route_skew" in a for a in bal)
    fs = command(Case("gpt_moe_bench", 2, "fssdp", "natural"), QUICK, tmp_path)
    assert (
        "train.log_every=1" in fs
        and "--nproc_per_node=2" in fs
        and "train.routing_trace=true" in fs
    )
    assert f"train.global_batch_size={2 * QUICK.batch_per_rank}" in fs
    full = parse([])[0]
    assert sum(c.system == "fssdp_predict" for c in cases(full)) == 4  # full run
    assert full.steps - full.warmup >= 30 and full.batch_per_rank * full.seq_len >= 4096
    w4 = command(Case("gpt_moe_bench", 4, "ep", "skewed"), full, tmp_path)
    assert f"train.global_batch_size={4 * full.batch_per_rank}" in w4  # tokens per rank fixed
    pred = command(Case("gpt_moe_bench", 2, "fssdp_predict", "skewed"), QUICK, tmp_path)
    assert "parallel=fssdp" in pred and "parallel.plan_mode=predict" in pred
    some = cases(parse(["--systems", "fssdp", "ep"])[0])
    assert {c.system for c in some} == {"fssdp", "ep"} and Case(*bal_key) in some
    assert not any(c.routing == "balanced" for c in cases(parse(["--systems", "fssdp"])[0]))
    moeut = cases(parse(["--models", "moeut_tiny"])[0])
    assert all(c.system not in ("deepspeed", "fssdp_predict") for c in moeut)


def test_report_schema_and_ratios() -> None:
    every = replace(QUICK, systems=tuple(x for x in SYSTEMS if x != "fssdp_predict"))
    raw = {"records": {}, "failed": {}}
    for c in cases(every):
        step = STEP_S[c.system] * (0.8 if c.routing == "balanced" else 1.0)
        raw["records"][c.key] = [fake_run(step, 1.05 if c.system == "fssdp" else 1.9)]
    raw["failed"]["gpt_moe_bench/w2/ddp/natural"] = "exit 1: boom"
    del raw["records"]["gpt_moe_bench/w2/ddp/natural"]
    report = json.loads(json.dumps(build_report(every, raw, ["--quick"])))  # JSON-clean
    assert set(report) >= {"command", "settings", "machine", "cases", "ratios", "targets"}
    case = report["cases"]["gpt_moe_bench/w2/fssdp/skewed"]
    assert case["step_time_s"] == 1.0 and case["tokens_per_s"] == TOKENS  # warm-up dropped
    assert case["steps_measured"] == QUICK.steps - QUICK.warmup and case["comm_bytes"]["a2a"] == 100
    assert case["phase_time_s"]["expert"] == {"mean": pytest.approx(0.15), "max": 0.2}
    assert report["cases"]["gpt_moe_bench/w2/ddp/natural"]["error"] == "exit 1: boom"
    r = report["ratios"]["gpt_moe_bench"]["2"]
    assert r["skewed"]["fssdp_over_ep"] == pytest.approx(1.5)
    assert r["skewed"]["fssdp_over_deepspeed"] == pytest.approx(3.0)
    assert r["natural"]["fssdp_over_ddp"] is None  # the failed case
    assert r["fssdp_skewed_step_over_ep_balanced_step"] == pytest.approx(1.0 / 1.2)
    assert r["skewed"]["fssdp_predict_over_ep"] is None  # not in the quick run
    assert r["skewed"]["fssdp_gated_over_ep"] == pytest.approx(1.5 / 0.9)
    t = report["targets"]["gpt_moe_bench"]
    assert t["fssdp_over_ep>=1.3"] == [pytest.approx(1.5), True]
    assert t["fssdp_straggler<=1.1"][1] is True
    assert t["skewed_step/ep_balanced_step<=1.05"] == [pytest.approx(1.0 / 1.2), True]
    every, met = t["fssdp_over_ep>=1.0_everywhere"]
    assert every == {"w2/natural": pytest.approx(1.5), "w2/skewed": pytest.approx(1.5)} and met


def test_spread_of_repeats_and_steps() -> None:
    runs = [fake_run(1.0, 1.0, steps=12), fake_run(1.2, 1.0, steps=12)]
    fig = summarize(runs, QUICK.warmup, TOKENS)
    assert fig["repeat_step_time_s"] == [1.0, 1.2]
    assert fig["repeat_spread"] == pytest.approx(0.2 / fig["step_time_s"])
    lo, hi = fig["step_time_p10_p90_s"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.2)


def test_dense_phases_of_a_case() -> None:
    """The window table's drift marker: the slowest rank's forward + backward, per step."""
    recs = fake_run(1.0, 1.0, steps=12)
    for r in recs:
        r["phase_time_s"]["backward"] = [0.5, 0.7]
    fig = summarize([recs], QUICK.warmup, TOKENS)
    assert dense_s(fig) == pytest.approx(0.3 + 0.7)
    assert dense_s({"phase_time_s": {"forward": {"max": 1.0}}}) is None  # no backward phase
    rep = {"cases": {"m/w2/ep/natural": fig, "m/w2/deepspeed/natural": {**fig, "phase_time_s": {}}}}
    rows = window_table(rep).splitlines()[2:]
    assert rows[0].endswith("| 1.000 |") and rows[1].endswith("| — |")


def test_summarize_needs_measured_steps() -> None:
    with pytest.raises(ValueError, match="no measured steps"):
        summarize([fake_run(1.0, 1.0, steps=QUICK.warmup)], QUICK.warmup, TOKENS)


def test_balanced_routing_is_exactly_even() -> None:
    ids = round_robin_experts(1024, 2, 16)
    assert torch.bincount(ids.flatten(), minlength=16).tolist() == [128] * 16
    assert (ids[:, 0] != ids[:, 1]).all()
    logits = torch.randn(64, 4, 8)  # [tokens, heads, experts]: each head balanced too
    r = balanced_route(logits, 2, "sigmoid")
    for h in range(4):
        assert torch.bincount(r.expert_TK[:, h].flatten(), minlength=8).tolist() == [16] * 8
    assert torch.allclose(r.gate_TK, torch.sigmoid(logits).gather(-1, r.expert_TK))


def test_missing_deepspeed_is_one_line_exit_2_or_left_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from perf import deepspeed_setup

    monkeypatch.setattr(deepspeed_setup, "available", lambda: False)
    with pytest.raises(SystemExit) as e:
        deepspeed_setup.ensure(True, install_now=False)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "pip install -e '.[bench]'" in err, err
    deepspeed_setup.ensure(False, install_now=False)  # its cases left out: nothing to do
    systems = {c.system for c in cases(replace(QUICK, deepspeed=False))}
    assert "deepspeed" not in systems and "deepspeed" in {c.system for c in cases(QUICK)}
