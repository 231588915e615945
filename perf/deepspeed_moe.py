"""DeepSpeed-MoE baseline: GPT-MoE with `deepspeed.moe.layer.MoE`, trained like `launch.train`.

    torchrun --nproc_per_node W -m perf.deepspeed_moe model=gpt_moe_bench train.steps=10 \
        train.log_every=1 hydra.run.dir=<run dir> [model.route_skew=1.5]

Same hydra overrides as `launch.train` (model, train, data, optim, seed), same data (the
`launch.data` sampler: same seed, same global batch, rank r takes its slice), same loss (global
mean cross-entropy + switch aux), same AdamW and lr schedule, gloo. DeepSpeed runs the model
through its engine (ZeRO stage 0, fp32): expert parallelism over all W ranks (ep_size = W, E/W
experts per rank), dense gradients all-reduced by the engine, drop_tokens=False (capacity = the
largest expert's load, so no token is dropped). Writes `<run dir>/metrics.jsonl` records with the
keys compare reads (step, loss, tokens_per_s, step_time_s, rank_step_time_s, rank_expert_time_s,
straggler_ratio, comm_bytes, model_state_bytes); `train.profile_steps=[a,b]` writes
`<run dir>/profile/rank{r}.json` as `launch.train` does (`python -m perf.profile_breakdown`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.dist import all_gather_floats, batch_reducer
from launch.metrics import expert_load_imbalance
from launch.optim import build_optimizer, set_lr
from launch.profile import StepProfiler
from launch.trainer import lm_loss
from models.common.context import MoEContext
from perf.ds_model import A2AMeter, build_ds_gpt_moe, install_skew


def _engine(model: torch.nn.Module, cfg: Any, world: int) -> Any:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    opt = build_optimizer(list(model.named_parameters()), cfg.optim)
    named = [{**g, "name": n} for n, g in zip(("decay", "no_decay"), opt.param_groups)]
    groups = split_params_into_different_moe_groups_for_optimizer(named)
    opt = torch.optim.AdamW(groups, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    ds_cfg = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.global_batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    return engine


def _state_bytes(engine: Any) -> int:
    total = sum(2 * p.numel() * p.element_size() for p in engine.module.parameters())
    for st in engine.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def _global(load: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tokens per expert per bank over all ranks (DeepSpeed's gate counts this rank's): one
    all-reduce of the banks' counts side by side."""
    names = sorted(load)
    if not names:
        return {}
    counts_BE = torch.stack([load[n].to(torch.int64) for n in names])
    dist.all_reduce(counts_BE)
    return dict(zip(names, counts_BE.unbind(0)))


def _sum_over_ranks(n: int) -> int:
    t = torch.tensor([n], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def train(cfg: Any, run_dir: Path) -> None:
    import deepspeed

    from launch.data import GlobalBatchSampler, build_streams

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    stream, _ = build_streams(cfg.data)
    sampler = GlobalBatchSampler(stream, cfg.seed, t.global_batch_size, t.seq_len, rank, world)
    install_skew(cfg.model.num_experts, cfg.model.route_skew)
    meter = A2AMeter(world)
    meter.install()
    torch.manual_seed(cfg.seed)
    model, clock = build_ds_gpt_moe(cfg.model, rank, world)
    engine = _engine(model, cfg, world)
    reducer = batch_reducer()
    dense_bytes = sum(
        p.numel() * p.element_size()
        for p in engine.module.parameters()
        if getattr(p, "allreduce", True)
    )
    out = open(run_dir / "metrics.jsonl", "w") if rank == 0 else None
    profiler = StepProfiler(list(t.profile_steps), run_dir, rank, torch.device("cpu"))
    for step in range(1, t.steps + 1):
        profiler.before_step(step)
        t0 = time.perf_counter()
        inputs_BS, targets_BS = sampler.next()
        ctx = MoEContext(reducer=reducer)
        logits_BSV = engine(inputs_BS, ctx)
        loss = lm_loss(logits_BSV, targets_BS, reducer)
        aux = ctx.aux_total()
        engine.backward(loss if aux is None else loss + aux)
        set_lr(engine.optimizer, step - 1, t.steps, cfg.optim)
        engine.step()
        dt = time.perf_counter() - t0
        profiler.after_step(step)
        record = _record(step, float(loss), dt, clock.take(), meter.take(), engine, t, world)
        record["expert_load_imbalance"] = expert_load_imbalance(_global(ctx.expert_load))
        record["comm_bytes"]["dense"] = 2 * (world - 1) * dense_bytes  # ring all-reduce
        if out is not None and (step % t.log_every == 0 or step in (1, t.steps)):
            out.write(json.dumps(record) + "\n")
            out.flush()
    if out is not None:
        out.close()


def _record(
    step: int, loss: float, dt: float, expert_s: float, a2a: int, engine: Any, t: Any, world: int
) -> dict[str, Any]:
    dev = torch.device("cpu")
    rank_times = all_gather_floats(dt, dev)
    rank_expert = all_gather_floats(expert_s, dev)
    mean_expert = sum(rank_expert) / len(rank_expert)
    return {
        "step": step,
        "loss": loss,
        "tokens_per_s": t.global_batch_size * t.seq_len / max(rank_times),
        "step_time_s": max(rank_times),
        "rank_step_time_s": rank_times,
        "rank_expert_time_s": rank_expert,
        "straggler_ratio": max(rank_expert) / mean_expert if mean_expert > 0 else None,
        "comm_bytes": {"spag": 0, "sprs": 0, "a2a": _sum_over_ranks(a2a), "dense": 0},
        "model_state_bytes": all_gather_floats(float(_state_bytes(engine)), dev),
    }


def main(argv: list[str]) -> None:
    from launch.errors import UserError, fail
    from launch.train import compose_config

    try:
        job, run_dir = compose_config(argv)
        cfg: Any = OmegaConf.to_object(job)
        if cfg.model.family != "gpt_moe":
            raise UserError(
                f"perf.deepspeed_moe builds GPT-MoE only, got model family "
                f"{cfg.model.family!r}: use model=gpt_moe_<size>"
            )
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        train(cfg, Path(run_dir))
    except UserError as e:
        fail(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from launch.leave import run_main

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_main(lambda: main(sys.argv[1:]))
