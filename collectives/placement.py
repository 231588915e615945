"""Where the experts of one expert bank live: one owner per expert, plus replica holders.

Legend: E experts, W ranks (world size of the group the bank is sharded over), r a rank,
e an expert id. A placement is the set of (e, r) pairs; P0 (ownership) has exactly one pair per
expert, a materialized placement P1 ⊇ P0 adds replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Pair = tuple[int, int]  # (expert, rank)


@dataclass(frozen=True)
class Topology:
    """Ranks grouped into nodes of `ranks_per_node` consecutive ranks (torchrun's layout)."""

    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"Topology: world_size must be >= 1, got {self.world_size}")
        if self.ranks_per_node < 1 or self.world_size % self.ranks_per_node:
            raise ValueError(
                f"Topology: ranks_per_node={self.ranks_per_node} must be >= 1 and divide "
                f"world_size={self.world_size}"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"Topology: rank {rank} out of range [0, {self.world_size})")
        return rank // self.ranks_per_node


@dataclass(frozen=True)
class Placement:
    """Expert -> owner rank and expert -> holder ranks (owner included) for one bank.

    Build with `Placement.from_owners(...)` and `.with_replicas(...)`; the constructor validates
    and raises `ValueError` naming the first problem found.
    """

    num_experts: int
    world_size: int
    owner: tuple[int, ...]
    holders: tuple[frozenset[int], ...]

    def __post_init__(self) -> None:
        # Normalise containers so equality and hashing do not depend on what the caller passed.
        object.__setattr__(self, "owner", tuple(self.owner))
        object.__setattr__(self, "holders", tuple(frozenset(h) for h in self.holders))
        E, W = self.num_experts, self.world_size
        if W < 1:
            raise ValueError(f"Placement: world_size must be >= 1, got {W}")
        if E < 0:
            raise ValueError(f"Placement: num_experts must be >= 0, got {E}")
        if len(self.owner) != E:
            raise ValueError(f"Placement: owner has {len(self.owner)} entries, expected E={E}")
        if len(self.holders) != E:
            raise ValueError(f"Placement: holders has {len(self.holders)} entries, expected E={E}")
        for e, (o, hs) in enumerate(zip(self.owner, self.holders)):
            if o is None or not isinstance(o, int) or o < 0:
                raise ValueError(f"Placement: expert {e} has no owner (owner[{e}]={o!r})")
            if o >= W:
                raise ValueError(f"Placement: expert {e}: owner rank {o} out of range [0, {W})")
            bad = sorted(r for r in hs if not isinstance(r, int) or not 0 <= r < W)
            if bad:
                raise ValueError(
                    f"Placement: expert {e}: holder rank(s) {bad} out of range [0, {W})"
                )
            if o not in hs:
                raise ValueError(
                    f"Placement: expert {e}: holder set {sorted(hs)} does not include its "
                    f"owner rank {o}"
                )

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def from_owners(owner: Sequence[int], world_size: int) -> Placement:
        """Ownership-only placement (P0): expert e lives on rank owner[e] alone."""
        owner_t = tuple(owner)
        holders = tuple(frozenset([o]) if isinstance(o, int) else frozenset() for o in owner_t)
        return Placement(len(owner_t), world_size, owner_t, holders)

    def with_replicas(self, replicas: Mapping[int, Iterable[int]]) -> Placement:
        """A new placement with ranks added to the holders of the given experts."""
        holders = list(self.holders)
        for e, ranks in replicas.items():
            if not 0 <= e < self.num_experts:
                raise ValueError(f"Placement: expert {e} out of range [0, {self.num_experts})")
            holders[e] = holders[e] | frozenset(ranks)
        return Placement(self.num_experts, self.world_size, self.owner, tuple(holders))

    def ownership(self) -> Placement:
        """P0 of this placement: same owners, no replicas."""
        return Placement.from_owners(self.owner, self.world_size)

    # -- queries ------------------------------------------------------------------------------

    def held(self, rank: int) -> list[int]:
        """Sorted expert ids that `rank` holds (as owner or replica)."""
        return [e for e, hs in enumerate(self.holders) if rank in hs]

    def owned(self, rank: int) -> list[int]:
        """Sorted expert ids that `rank` owns."""
        return [e for e, o in enumerate(self.owner) if o == rank]

    def pairs(self) -> frozenset[Pair]:
        return frozenset((e, r) for e, hs in enumerate(self.holders) for r in hs)

    def is_ownership_only(self) -> bool:
        return all(len(hs) == 1 for hs in self.holders)

    def is_subset_of(self, other: Placement) -> bool:
        """True when both describe the same bank and every (e, r) of self is in other."""
        return (
            self.num_experts == other.num_experts
            and self.world_size == other.world_size
            and all(a <= b for a, b in zip(self.holders, other.holders))
        )

    def extra_pairs(self, base: Placement) -> list[Pair]:
        """(e, r) pairs in self but not in base, sorted by expert then rank."""
        if base.num_experts != self.num_experts:
            raise ValueError(
                f"Placement: cannot compare banks of {self.num_experts} and {base.num_experts} "
                "experts"
            )
        return [
            (e, r)
            for e in range(self.num_experts)
            for r in sorted(self.holders[e] - base.holders[e])
        ]

    def num_replicas(self) -> list[int]:
        """Per expert: number of replicas, i.e. holders other than the owner (0 = owner only)."""
        return [len(hs) - 1 for hs in self.holders]
