"""The cases `perf.compare` runs, and the command line of each (the real trainer under torchrun).

A case is (model, world, system, routing): system is a `parallel=` strategy, `deepspeed`
(perf/deepspeed_moe.py) or `fssdp_predict` (fssdp in the paper's predict mode, PREDICT);
routing is `natural`, `skewed` (`model.route_skew`) or `balanced` (perf/balanced_train.py:
round-robin routing, the no-imbalance reference, EP only).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SYSTEMS = ("fssdp", "ep", "fsdp", "ddp", "deepspeed", "fssdp_predict")
ROUTINGS = ("natural", "skewed")
# fssdp planning ahead from the sliding-window estimate (the paper's mode; the default plans
# after routing with the true counts, `exact`): GPT-MoE only, to keep the full run short.
PREDICT = ("parallel=fssdp", "parallel.plan_mode=predict")
GPT_ONLY = ("deepspeed", "fssdp_predict")


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    worlds: tuple[int, ...]
    steps: int  # optimizer steps per run
    warmup: int  # first steps of each run left out of the figures
    repeats: int  # runs of each case, interleaved with the other cases
    global_batch: int
    seq_len: int
    skew: float  # model.route_skew of the skewed cases
    seed: int = 0
    with_predict: bool = True  # also run fssdp_predict
    deepspeed: bool = True  # also run the DeepSpeed-MoE baseline (perf/deepspeed_setup.py)
    extra: tuple[str, ...] = ()  # more overrides for every run (e.g. model.num_experts=64)

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Settings(("gpt_moe_bench", "moeut_tiny"), (2, 4), 8, 3, 2, 8, 256, 1.0)
QUICK = Settings(("gpt_moe_bench",), (2,), 5, 2, 1, 8, 256, 1.0, with_predict=False)


@dataclass(frozen=True)
class Case:
    model: str
    world: int
    system: str
    routing: str

    @property
    def key(self) -> str:
        return f"{self.model}/w{self.world}/{self.system}/{self.routing}"


def cases(s: Settings) -> list[Case]:
    """Every case of a run, in a fixed order (DeepSpeed builds GPT-MoE only)."""
    out = []
    for model in s.models:
        for world in s.worlds:
            for routing in ROUTINGS:
                for system in SYSTEMS:
                    if system in GPT_ONLY and not model.startswith("gpt_moe"):
                        continue
                    if system == "fssdp_predict" and not s.with_predict:
                        continue
                    if system == "deepspeed" and not s.deepspeed:
                        continue
                    out.append(Case(model, world, system, routing))
            out.append(Case(model, world, "ep", "balanced"))
    return out


def command(case: Case, s: Settings, run_dir: Path) -> list[str]:
    """torchrun command line of one run of `case`."""
    if case.system == "deepspeed":
        module = "perf.deepspeed_moe"
    elif case.routing == "balanced":
        module = "perf.balanced_train"
    else:
        module = "launch.train"
    args = [
        f"model={case.model}",
        f"train.steps={s.steps}",
        "train.log_every=1",
        f"train.global_batch_size={s.global_batch}",
        f"train.seq_len={s.seq_len}",
        "train.progress=false",
        "data.val_batches=1",
        f"seed={s.seed}",
        f"hydra.run.dir={run_dir}",
    ]
    if case.system == "fssdp_predict":
        args += [*PREDICT, "train.routing_trace=true"]
    elif case.system != "deepspeed":
        args += [f"parallel={case.system}", "train.routing_trace=true"]
    if case.routing == "skewed":
        args.append(f"model.route_skew={s.skew}")
    args += list(s.extra)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", f"--nproc_per_node={case.world}", "-m", module, *args]
