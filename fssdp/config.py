"""`parallel=` configuration: which strategy runs the model, and its knobs."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("none", "ddp", "fsdp", "ep", "fssdp")
PLAN_MODES = ("predict", "exact", "calibrate")


@dataclass
class ParallelConfig:
    strategy: str = "ddp"  # none | ddp | fsdp | ep | fssdp
    # Seconds a collective may wait before the run fails naming rank and phase.
    timeout_s: float = 300.0
    # Ranks per node for the topology (0: LOCAL_WORLD_SIZE from torchrun).
    ranks_per_node: int = 0
    # -- fssdp (DESIGN.md §2) --
    # exact: plan with the true counts after routing (measured best, README "Performance");
    # predict: plan ahead from the load estimate; calibrate: predict, then top up with true counts.
    plan_mode: str = "exact"  # exact | predict | calibrate
    memory_cap: int = 2  # m: extra expert slots per rank, per bank
    overlap_degree: int = -1  # t: -1 = from the measured overlap time and bandwidth
    load_window: int = 5  # w: iterations in the sliding-window load estimate
    rematerialize: bool = False  # free replicas after forward, gather again before backward
    reshard_every: int = 100  # K: heterogeneous re-sharding period in steps (0 = never)
    collective_algorithm: str = "auto"  # sparse collectives: auto | a2a | tree
