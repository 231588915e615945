"""`parallel=` configuration: which strategy runs the model, and its knobs."""

from __future__ import annotations

from dataclasses import dataclass

from fssdp.rules import above, at_least, one_of

PLAN_MODES = ("predict", "exact", "calibrate")


def strategy_names() -> list[str]:
    """The registered strategies (fssdp/strategies/registry.py), looked up when asked: the
    registry's modules import this one, so it is not imported at module level."""
    from fssdp.strategies.registry import strategy_names as names

    return names()


@dataclass
class ParallelConfig:
    strategy: str = "ddp"  # a registered strategy: none | ddp | fsdp | ep | fssdp
    # Seconds a collective may wait before the run fails naming rank and phase.
    timeout_s: float = 300.0
    # Ranks per node for the topology (0: LOCAL_WORLD_SIZE from torchrun).
    ranks_per_node: int = 0
    # -- fssdp ([Note: one step of a bank] in fssdp/executor.py) --
    # exact: plan with the true counts after routing (measured best, README "Performance");
    # predict: plan ahead from the load estimate; calibrate: predict, then top up with true counts.
    plan_mode: str = "exact"  # exact | predict | calibrate
    memory_cap: int = 2  # m: extra expert slots per rank, per bank
    # exact mode on more than one node: replicas per rank (of m) given first to the experts a
    # node's own tokens use most ([Note: node-local replicas] in fssdp/plan_local.py);
    # -1 = m - 1 (at most m - 1: one slot per rank stays for balancing), 0 = off.
    node_local_slots: int = -1
    # true: exact mode replicates only where the rows it levels cost more time than the copies
    # ([Note: when replication pays] in fssdp/policy.py); false: always the balancing plan.
    # Off by default until its runs are understood (README "Performance").
    cost_aware: bool = False
    overlap_degree: int = -1  # t: -1 = from the measured overlap time and bandwidth
    load_window: int = 5  # w: iterations in the sliding-window load estimate
    rematerialize: bool = False  # free replicas after forward, gather again before backward
    reshard_every: int = 100  # K: heterogeneous re-sharding period in steps (0 = never)
    collective_algorithm: str = "auto"  # sparse collectives: auto | a2a | tree | tree_nodes


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
RULES = (
    one_of("strategy", strategy_names, "e.g. {key}=ddp"),
    above("timeout_s", 0, "e.g. {key}=300 (seconds a collective may wait)"),
    at_least("ranks_per_node", 0, "e.g. {key}=0 (from torchrun)", note="0 = from torchrun"),
    one_of("plan_mode", PLAN_MODES, "e.g. {key}=exact"),
    at_least("memory_cap", 0, "e.g. {key}=2 (extra expert slots per rank per bank)"),
    at_least("node_local_slots", -1, "e.g. {key}=-1", note="-1 = memory_cap - 1, 0 = off"),
    at_least("overlap_degree", -1, "e.g. {key}=-1", note="-1 = from measured timings"),
    at_least("load_window", 1, "e.g. {key}=5"),
    at_least("reshard_every", 0, "e.g. {key}=100", note="0 = never"),
    one_of("collective_algorithm", ("auto", "a2a", "tree", "tree_nodes")),
)
