"""The cases `perf.compare` runs, and the command line of each (the real trainer under torchrun).

A case is (model, world, system, routing): system is a `parallel=` strategy, `deepspeed`
(perf/deepspeed_moe.py) or a fssdp variant (VARIANTS: `fssdp_predict`, `fssdp_gated`); routing
is `natural`, `skewed` (`model.route_skew`) or `balanced` (perf/balanced_train.py: round-robin
routing, the no-imbalance reference, EP only).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROUTINGS = ("natural", "skewed")
# fssdp variants beside the defaults (`exact`: plan after routing with the true counts, no cost
# gate): the paper's predict mode (planning ahead from the sliding-window estimate; GPT-MoE
# only, to keep the full run short), and exact mode with its cost gate on ([Note: when
# replication pays] in fssdp/policy.py).
VARIANTS = {
    "fssdp_predict": ("parallel=fssdp", "parallel.plan_mode=predict"),
    "fssdp_gated": ("parallel=fssdp", "parallel.cost_aware=true"),
}
SYSTEMS = ("fssdp", "ep", "fsdp", "ddp", "deepspeed", *VARIANTS)
GPT_ONLY = ("deepspeed", "fssdp_predict")


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    worlds: tuple[int, ...]
    steps: int  # optimizer steps per run
    warmup: int  # first steps of each run left out of the figures
    repeats: int  # runs of each case, interleaved with the other cases
    batch_per_rank: int  # sequences per rank per step: tokens per rank stay fixed across worlds
    seq_len: int
    skew: float  # model.route_skew of the skewed cases
    seed: int = 0
    deepspeed: bool = True  # also run the DeepSpeed-MoE baseline (perf/deepspeed_setup.py)
    extra: tuple[str, ...] = ()  # more overrides for every run (e.g. model.num_experts=64)
    systems: tuple[str, ...] = SYSTEMS  # a subset of SYSTEMS to run (EP's balanced case with ep)

    def as_dict(self) -> dict:
        return asdict(self)

    def global_batch(self, world: int) -> int:
        """Sequences per step at `world` (train.global_batch_size)."""
        return self.batch_per_rank * world

    def tokens(self, world: int) -> int:
        """Tokens per step at `world`."""
        return self.global_batch(world) * self.seq_len


# [Note: a benchmark that resembles training]
# FULL measures 30 steps per run after 5 of warm-up (the first steps pay for allocator growth,
# the first plans and the optimizer's state), 2 interleaved repeats, 16 sequences of 256 tokens
# per rank (4096 tokens per rank, at every world: weak scaling, as a cluster job runs), so the
# experts' matmuls weigh more than the optimizer and the Python overheads. The skew of the
# skewed cases (`model.route_skew`, a Zipf bias on the router's logits) is not learned away over
# such a run on these models: each case's window reports its measured expert-load imbalance
# (max/mean rows per bank, median over steps) beside its figures. QUICK is a smoke run of the
# same code (6 steps, 4 sequences per rank; fssdp, its gated variant, EP, DeepSpeed): minutes,
# not a measurement to quote.
FULL = Settings(("gpt_moe_bench", "moeut_tiny"), (2, 4), 35, 5, 2, 16, 256, 1.0)
QUICK_SYSTEMS = ("fssdp", "fssdp_gated", "ep", "deepspeed")
QUICK = Settings(("gpt_moe_bench",), (2,), 6, 2, 1, 4, 256, 1.0, systems=QUICK_SYSTEMS)


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
                for system in s.systems:
                    if system in GPT_ONLY and not model.startswith("gpt_moe"):
                        continue
                    if system == "deepspeed" and not s.deepspeed:
                        continue
                    out.append(Case(model, world, system, routing))
            if "ep" in s.systems:
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
        f"train.global_batch_size={s.global_batch(case.world)}",
        f"train.seq_len={s.seq_len}",
        "train.progress=false",
        # no figures (rank 0 would draw two, 0.55 s each for gpt_moe_bench, about nine times a
        # run while the others wait) and no final checkpoint: the runs measure training
        "train.load_figures=0",
        "train.checkpoints=false",
        "data.val_batches=1",
        f"seed={s.seed}",
        f"hydra.run.dir={run_dir}",
    ]
    if case.system in VARIANTS:
        args += [*VARIANTS[case.system], "train.routing_trace=true"]
    elif case.system != "deepspeed":
        args += [f"parallel={case.system}", "train.routing_trace=true"]
    if case.routing == "skewed":
        args.append(f"model.route_skew={s.skew}")
    args += list(s.extra)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", f"--nproc_per_node={case.world}", "-m", module, *args]
