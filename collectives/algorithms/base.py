"""The protocol every sparse collective algorithm implements, the registry, and the cost rule.

Legend: E experts, W ranks; `small` ⊆ `big` are the two placements of one call in the spAG
direction (spAG: from ⊆ to; spRS: to ⊆ from, since a reduce runs a broadcast backwards).

# [Note: algorithms]
An algorithm is a class with a `name`, registered with `@register`, that
  - builds its `Schedule` from the new holder pairs (`build_schedule`, class method);
  - prices it (`cost`, bytes on the busiest link plus latencies, `CostModel` units);
  - issues a gather (`issue_gather`) and a reduce (`issue_reduce`) of the rows `GatherRows` /
    `ReduceRows` describe, returning the function that completes them.
`choose` builds each candidate's schedule once and returns the cheapest *instance*, schedule
included, so nothing is built twice; the instance can be passed as `algorithm=` to both
`sparse_all_gather(P0 -> P1)` and `sparse_reduce_scatter(P1 -> P0)` of the same step. Byte
counts come from the schedule (`stats`), so every algorithm reports them the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

from collectives.comm import Call, CommStats
from collectives.placement import Placement, Topology
from collectives.rows import GatherRows, ReduceRows
from collectives.schedule import DEFAULT_COST, CostModel, Diff, RankView, Schedule

Finish = Callable[[], None]  # completes an issued transfer (waits, lands staged rows)


class Algorithm(ABC):
    """One way to run spAG / spRS for one pair of placements (see [Note: algorithms])."""

    name: ClassVar[str]

    def __init__(
        self, schedule: Schedule, small: Placement, big: Placement, topology: Topology | None
    ) -> None:
        self.schedule, self.small, self.big, self.topology = schedule, small, big, topology
        self._prices: dict[tuple[int, CostModel], float] = {}

    @classmethod
    def build(
        cls,
        small: Placement,
        big: Placement,
        topology: Topology | None = None,
        diff: Diff | None = None,
    ) -> Algorithm:
        d = diff if diff is not None else Diff.of(small, big)
        return cls(cls.build_schedule(d, topology), small, big, topology)

    @classmethod
    @abstractmethod
    def build_schedule(cls, diff: Diff, topology: Topology | None) -> Schedule:
        """The spAG-direction schedule (spRS runs it reversed)."""

    @abstractmethod
    def cost(self, expert_bytes: int, cost_model: CostModel) -> float:
        """Modelled cost in bytes of running the schedule (either direction)."""

    @abstractmethod
    def issue_gather(self, call: Call, rows: GatherRows) -> Finish:
        """Start moving every new holder's row (sends read `rows.send`, receives land via
        `rows.receiver`); return what completes it."""

    @abstractmethod
    def issue_reduce(self, call: Call, rows: ReduceRows) -> Finish:
        """Start folding each expert's copies into its owner (`rows.fold`, then
        `rows.complete` for experts nobody sent); return what completes it."""

    # -- shared -------------------------------------------------------------------------------
    def price(self, expert_bytes: int, cost_model: CostModel) -> float:
        """`cost`, computed once per (expert_bytes, cost_model)."""
        key = (expert_bytes, cost_model)
        if key not in self._prices:
            self._prices[key] = self.cost(expert_bytes, cost_model)
        return self._prices[key]

    def view(self, rank: int, reduce: bool) -> RankView:
        """This rank's part of the schedule, in the direction of the op."""
        return (self.schedule.reversed() if reduce else self.schedule).for_rank(rank)

    def stats(self, rank: int, row_bytes: int, reduce: bool) -> CommStats:
        return self.view(rank, reduce).stats(row_bytes)

    def matches(self, small: Placement, big: Placement) -> bool:
        """Whether this instance was built for these placements."""
        return (self.small is small or self.small == small) and (self.big is big or self.big == big)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rounds={len(self.schedule)})"


_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `cls` selectable by name and a candidate of algorithm='auto'."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register: {cls.__name__} needs a class attribute name (not 'auto')")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"register: algorithm {name!r} is already {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    _BUILT.clear()  # "auto" has another candidate now
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    _BUILT.clear()


def names() -> tuple[str, ...]:
    """Registered algorithm names, sorted (the same on every rank)."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise ValueError(f"algorithm must be 'auto' or one of {list(names())}, got {name!r}")
    return _REGISTRY[name]


def ordered(pf: Placement, pt: Placement) -> tuple[Placement, Placement]:
    """(small, big) of a call in either direction."""
    return (pf, pt) if pf.is_subset_of(pt) else (pt, pf)


def candidates(
    placement_from: Placement,
    placement_to: Placement,
    algorithm: str = "auto",
    topology: Topology | None = None,
) -> list[Algorithm]:
    """Every registered algorithm (or the one named), built: schedules built once each."""
    small, big = ordered(placement_from, placement_to)
    return build_all(small, big, algorithm, topology)


# [Note: built algorithms are memoised]
# A step calls spAG, maybe a rematerialising spAG, and spRS with the same two placement objects;
# placements are immutable, so what was built for them is kept (the last _BUILT_MAX pairs). The
# entry holds the placements themselves, so their ids cannot be reused by other objects while it
# lives, and a hit needs the very same objects (`is`). Registering or unregistering an algorithm
# clears it. Passing `choose(...)`'s instance as `algorithm=` skips even the lookup.
_BUILT: OrderedDict[tuple, tuple[Placement, Placement, list[Algorithm]]] = OrderedDict()
_BUILT_MAX = 64


def build_all(
    small: Placement, big: Placement, algorithm: str, topology: Topology | None
) -> list[Algorithm]:
    """Every registered algorithm (or the one named) built for small ⊆ big; memoised."""
    key = (id(small), id(big), algorithm, topology)
    hit = _BUILT.get(key)
    if hit is not None and hit[0] is small and hit[1] is big:
        _BUILT.move_to_end(key)
        return hit[2]
    todo = names() if algorithm == "auto" else (algorithm,)
    classes = [get(n) for n in todo]
    diff = Diff.of(small, big)
    algos = [c.build(small, big, topology, diff) for c in classes]
    _BUILT[key] = (small, big, algos)
    while len(_BUILT) > _BUILT_MAX:
        _BUILT.popitem(last=False)
    return algos


def choose(
    placement_from: Placement,
    placement_to: Placement,
    *,
    expert_bytes: int,
    algorithm: str = "auto",
    cost_model: CostModel = DEFAULT_COST,
    topology: Topology | None = None,
) -> Algorithm:
    """The algorithm to run, with its schedule: the named one, or with 'auto' the lowest
    modelled cost (ties to the name that sorts first: 'a2a', one collective, before 'tree').
    A pure function of its arguments, so every rank agrees."""
    algos = candidates(placement_from, placement_to, algorithm, topology)
    return cheapest(algos, expert_bytes, cost_model)


def cheapest(algos: list[Algorithm], expert_bytes: int, cost_model: CostModel) -> Algorithm:
    if len(algos) == 1:
        return algos[0]
    return min(algos, key=lambda a: (a.price(expert_bytes, cost_model), a.name))


def algorithm_costs(
    placement_from: Placement,
    placement_to: Placement,
    *,
    expert_bytes: int,
    cost_model: CostModel = DEFAULT_COST,
    topology: Topology | None = None,
) -> dict[str, float]:
    """Modelled cost in bytes of each registered algorithm; either direction (spAG: from ⊆ to;
    spRS: to ⊆ from), since a reduce costs the same as the broadcast it reverses."""
    algos = candidates(placement_from, placement_to, "auto", topology)
    return {a.name: a.price(expert_bytes, cost_model) for a in algos}


def choose_algorithm(
    placement_from: Placement,
    placement_to: Placement,
    *,
    expert_bytes: int,
    cost_model: CostModel = DEFAULT_COST,
    topology: Topology | None = None,
) -> str:
    """The name `choose(..., algorithm='auto')` picks ('tree' when the point-to-point binomial
    schedule's modelled cost is lower than one all-to-all's, else 'a2a', with the built-ins)."""
    return choose(
        placement_from,
        placement_to,
        expert_bytes=expert_bytes,
        cost_model=cost_model,
        topology=topology,
    ).name
