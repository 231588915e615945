"""Where the experts of one expert bank live: one owner per expert, plus replica holders.

Legend: E experts, W ranks (world size of the group the bank is sharded over), r a rank,
e an expert id, P holder pairs (owner pairs included). A placement is the set of (e, r) pairs;
P0 (ownership) has exactly one pair per expert, a materialized placement P1 ⊇ P0 adds replicas.

A placement is tensor-backed: `owner_E` (int64) and the holder pairs `(expert_P, rank_P)`
sorted by expert, then rank, on the device they were built on (the planners build them where
the counts live). The Python views (`owner`, `holders`, `held(r)`, ...) are computed on first
use and cached; the planners and the dispatcher use the tensor accessors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Pair = tuple[int, int]  # (expert, rank)
I64 = torch.int64


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
class PlannedRows:
    """Rows each holder pair of a placement is planned to compute for one count matrix.

    Set by the exact planner and calibration (fssdp/planner.py), which balance rows while they
    place replicas; `fssdp.assign.assign_tokens` uses them when called with the same counts
    ([Note: planned rows] in fssdp/quotas.py). `rows_P` follows the placement's pairs and stays
    on the host (a CPU tensor, whatever the counts' device) with the rest of the control plane.
    """

    counts_WE: Tensor
    rows_P: Tensor  # int64, CPU


def _is_rank(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Placement:
    """Expert -> owner rank and expert -> holder ranks (owner included) for one bank.

    `Placement(E, W, owner, holders)` takes Python sequences (owner[e], holders[e] a set of
    ranks) or tensors (owner_E int, holders_EW bool [E, W]) and validates, raising `ValueError`
    naming the first problem found. `from_owners`, `with_replicas` and `with_pairs` build the
    usual ones. Equality and hashing compare the (e, r) pairs and owners only.
    """

    __slots__ = ("num_experts", "world_size", "_owner_E", "_pe", "_pr", "_cache", "planned")

    def __init__(self, num_experts: int, world_size: int, owner: Any, holders: Any) -> None:
        E, W = num_experts, world_size
        if W < 1:
            raise ValueError(f"Placement: world_size must be >= 1, got {W}")
        if E < 0:
            raise ValueError(f"Placement: num_experts must be >= 0, got {E}")
        if isinstance(owner, Tensor) and isinstance(holders, Tensor):
            owner_E, pe, pr = _from_tensors(E, W, owner, holders)
        else:
            owner_E, pe, pr = _from_python(E, W, list(owner), list(holders))
        self._set(E, W, owner_E, pe, pr, None)

    def _set(
        self, E: int, W: int, owner_E: Tensor, pe: Tensor, pr: Tensor, planned: PlannedRows | None
    ) -> None:
        for k, v in (("num_experts", E), ("world_size", W), ("_owner_E", owner_E)):
            object.__setattr__(self, k, v)
        for k, v in (("_pe", pe), ("_pr", pr), ("_cache", {}), ("planned", planned)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Placement is immutable (tried to set {name!r})")

    @classmethod
    def _trusted(
        cls,
        owner_E: Tensor,
        expert_P: Tensor,
        rank_P: Tensor,
        world_size: int,
        planned: PlannedRows | None = None,
        cell_P: Tensor | None = None,
    ) -> Placement:
        """No validation: for callers that build sorted, unique, in-range pairs (planners);
        cell_P (expert_P * W + rank_P) when the caller has it."""
        p = cls.__new__(cls)
        p._set(int(owner_E.numel()), world_size, owner_E, expert_P, rank_P, planned)
        if cell_P is not None:
            p._cache["cell"] = cell_P
        return p

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def from_owners(owner: Sequence[int] | Tensor, world_size: int) -> Placement:
        """Ownership-only placement (P0): expert e lives on rank owner[e] alone."""
        if isinstance(owner, Tensor):
            o = owner.to(I64)
            E = int(o.numel())
            holders = torch.zeros(E, max(world_size, 0), dtype=torch.bool, device=o.device)
            ok = (o >= 0) & (o < world_size)
            holders[torch.arange(E, device=o.device)[ok], o[ok]] = True
            return Placement(E, world_size, o, holders)
        owner_t = list(owner)
        holders_py = [{o} if _is_rank(o) else set() for o in owner_t]
        return Placement(len(owner_t), world_size, owner_t, holders_py)

    def with_replicas(self, replicas: Mapping[int, Iterable[int]]) -> Placement:
        """A new placement with ranks added to the holders of the given experts."""
        es: list[int] = []
        rs: list[int] = []
        for e, ranks in replicas.items():
            if not 0 <= e < self.num_experts:
                raise ValueError(f"Placement: expert {e} out of range [0, {self.num_experts})")
            rl = list(ranks)
            bad = sorted(r for r in rl if not _is_rank(r) or not 0 <= r < self.world_size)
            if bad:
                raise ValueError(
                    f"Placement: expert {e}: holder rank(s) {bad} out of range "
                    f"[0, {self.world_size})"
                )
            es += [e] * len(rl)
            rs += rl
        dev = self._owner_E.device
        return self.with_pairs(
            torch.tensor(es, dtype=I64, device=dev), torch.tensor(rs, dtype=I64, device=dev)
        )

    def with_pairs(self, expert_P: Tensor, rank_P: Tensor) -> Placement:
        """A new placement with the (expert_P[i], rank_P[i]) pairs added (validated, vectorised)."""
        e, r = expert_P.to(self._pe.device, I64), rank_P.to(self._pe.device, I64)
        if e.numel():
            lo, hi = int(torch.minimum(e.min(), r.min())), int((e - self.num_experts).max())
            if lo < 0 or hi >= 0 or int(r.max()) >= self.world_size:
                raise ValueError(
                    f"Placement.with_pairs: experts must lie in [0, {self.num_experts}) and "
                    f"ranks in [0, {self.world_size})"
                )
        pe, pr = merge_pairs(self._pe, self._pr, e, r, self.world_size)
        return Placement._trusted(self._owner_E, pe, pr, self.world_size)

    def ownership(self) -> Placement:
        """P0 of this placement: same owners, no replicas (made once: calibration re-plans
        from it every bank step, and its own caches then carry over)."""

        def build() -> Placement:
            ar = torch.arange(self.num_experts, device=self._owner_E.device)
            return Placement._trusted(self._owner_E, ar, self._owner_E, self.world_size)

        return self._py("ownership", build)

    def to(self, device: torch.device | str) -> Placement:
        """The same placement with its tensors on `device` (cached per device)."""
        dev = torch.device(device)
        if self._owner_E.device == dev:
            return self
        key = ("to", str(dev))
        if key not in self._cache:
            self._cache[key] = Placement._trusted(
                self._owner_E.to(dev), self._pe.to(dev), self._pr.to(dev), self.world_size
            )
        return self._cache[key]

    # -- tensor accessors (fast paths) ----------------------------------------------------------

    @property
    def owner_E(self) -> Tensor:
        return self._owner_E

    def pairs_P(self) -> tuple[Tensor, Tensor]:
        """(expert_P, rank_P) of every holder pair, sorted by expert then rank."""
        return self._pe, self._pr

    def cells_P(self) -> Tensor:
        """expert_P * W + rank_P: each pair's index into a flattened [E, W] array (cached)."""
        if "cell" not in self._cache:
            self._cache["cell"] = self._pe * self.world_size + self._pr
        return self._cache["cell"]

    def holders_EW(self) -> Tensor:
        """Bool [E, W]: True where rank w holds expert e."""
        if "mask" not in self._cache:
            m = torch.zeros(
                self.num_experts * self.world_size, dtype=torch.bool, device=self._pe.device
            )
            m[self.cells_P()] = True
            self._cache["mask"] = m.view(self.num_experts, self.world_size)
        return self._cache["mask"]

    def num_holders_E(self) -> Tensor:
        return torch.bincount(self._pe, minlength=self.num_experts)

    def replicas_W(self) -> Tensor:
        """Per rank: replicas it holds (held, not owned)."""
        rep = self._pr != self._owner_E[self._pe]
        return torch.bincount(self._pr[rep], minlength=self.world_size)

    def held_ids(self, rank: int) -> Tensor:
        """Sorted expert ids that `rank` holds, as a tensor."""
        return torch.nonzero(self.holders_EW()[:, rank]).flatten()

    # -- Python views -------------------------------------------------------------------------

    def _py(self, key: str, build: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def owner(self) -> tuple[int, ...]:
        return self._py("owner", lambda: tuple(self._owner_E.tolist()))

    @property
    def holders(self) -> tuple[frozenset[int], ...]:
        def build() -> tuple[frozenset[int], ...]:
            out: list[list[int]] = [[] for _ in range(self.num_experts)]
            for e, r in zip(self._pe.tolist(), self._pr.tolist()):
                out[e].append(r)
            return tuple(frozenset(h) for h in out)

        return self._py("holders", build)

    def _pair_list(self) -> list[Pair]:
        return self._py("pair_list", lambda: list(zip(self._pe.tolist(), self._pr.tolist())))

    def held(self, rank: int) -> list[int]:
        """Sorted expert ids that `rank` holds (as owner or replica)."""
        return self._py(("held", rank), lambda: self.held_ids(rank).tolist())  # type: ignore[arg-type]

    def owned(self, rank: int) -> list[int]:
        """Sorted expert ids that `rank` owns."""
        return self._py(  # type: ignore[arg-type]
            ("owned", rank), lambda: torch.nonzero(self._owner_E == rank).flatten().tolist()
        )

    def pairs(self) -> frozenset[Pair]:
        return frozenset(self._pair_list())

    def is_ownership_only(self) -> bool:
        return self._pe.numel() == self.num_experts

    def is_subset_of(self, other: Placement) -> bool:
        """True when both describe the same bank and every (e, r) of self is in other."""
        if (self.num_experts, self.world_size) != (other.num_experts, other.world_size):
            return False
        pe, pr = self._pe.to(other._pe.device), self._pr.to(other._pe.device)
        return bool(other.holders_EW()[pe, pr].all())

    def extra_pairs(self, base: Placement) -> list[Pair]:
        """(e, r) pairs in self but not in base, sorted by expert then rank."""
        if base.num_experts != self.num_experts:
            raise ValueError(
                f"Placement: cannot compare banks of {self.num_experts} and {base.num_experts} "
                "experts"
            )
        if base.world_size != self.world_size:
            raise ValueError(
                f"Placement: cannot compare worlds of {self.world_size} and {base.world_size}"
            )
        new = ~base.holders_EW()[self._pe.to(base._pe.device), self._pr.to(base._pe.device)]
        new = new.to(self._pe.device)
        return list(zip(self._pe[new].tolist(), self._pr[new].tolist()))

    def num_replicas(self) -> list[int]:
        """Per expert: number of replicas, i.e. holders other than the owner (0 = owner only)."""
        return (self.num_holders_E() - 1).tolist()

    # -- identity -----------------------------------------------------------------------------

    def _key(self) -> tuple:
        return self._py(
            "key",
            lambda: (self.num_experts, self.world_size, self.owner, tuple(self._pair_list())),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        if (self.num_experts, self.world_size) != (other.num_experts, other.world_size):
            return False
        if self._pe.numel() != other._pe.numel():
            return False
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Placement(num_experts={self.num_experts}, world_size={self.world_size}, "
            f"owner={list(self.owner)}, holders={[sorted(h) for h in self.holders]})"
        )

    def __reduce__(self) -> tuple:
        return (_rebuild, (self.num_experts, self.world_size, self.owner, self._pair_list()))


def _rebuild(E: int, W: int, owner: tuple[int, ...], pairs: list[Pair]) -> Placement:
    holders: list[set[int]] = [set() for _ in range(E)]
    for e, r in pairs:
        holders[e].add(r)
    return Placement(E, W, list(owner), holders)


def merge_pairs(
    pe: Tensor, pr: Tensor, new_e: Tensor, new_r: Tensor, world_size: int
) -> tuple[Tensor, Tensor]:
    """Sorted unique union of sorted pairs (pe, pr) and any pairs (new_e, new_r)."""
    if new_e.numel() == 0:
        return pe, pr
    key = torch.cat([pe, new_e]) * world_size + torch.cat([pr, new_r])
    key = torch.unique(key)  # sorted
    return key // world_size, key % world_size


def _from_python(E: int, W: int, owner: list, holders: list) -> tuple[Tensor, Tensor, Tensor]:
    """Validate Python owner / holder sets (messages name the first bad expert) -> tensors."""
    if len(owner) != E:
        raise ValueError(f"Placement: owner has {len(owner)} entries, expected E={E}")
    if len(holders) != E:
        raise ValueError(f"Placement: holders has {len(holders)} entries, expected E={E}")
    keys: list[int] = []
    for e, (o, hs) in enumerate(zip(owner, holders)):
        if o is None or not _is_rank(o) or o < 0:
            raise ValueError(f"Placement: expert {e} has no owner (owner[{e}]={o!r})")
        if o >= W:
            raise ValueError(f"Placement: expert {e}: owner rank {o} out of range [0, {W})")
        hset = set(hs)
        bad = sorted(r for r in hset if not _is_rank(r) or not 0 <= r < W)
        if bad:
            raise ValueError(f"Placement: expert {e}: holder rank(s) {bad} out of range [0, {W})")
        if o not in hset:
            raise ValueError(
                f"Placement: expert {e}: holder set {sorted(hset)} does not include its owner "
                f"rank {o}"
            )
        keys += sorted(e * W + r for r in hset)
    key = torch.tensor(keys, dtype=I64)
    return torch.tensor(owner, dtype=I64), key // W, key % W


def _from_tensors(E: int, W: int, owner: Tensor, holders: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate owner_E / holders_EW tensors, vectorised (first bad expert named)."""
    if owner.shape != (E,) or owner.dtype.is_floating_point:
        raise ValueError(f"Placement: owner must be an integer tensor of shape [{E}], got {owner}")
    if holders.shape != (E, W) or holders.dtype != torch.bool:
        raise ValueError(
            f"Placement: holders must be a bool tensor of shape [{E}, {W}], got "
            f"{holders.dtype} {list(holders.shape)}"
        )
    o = owner.to(I64)
    ar = torch.arange(E, device=o.device)
    no_owner = o < 0
    out_of_range = o >= W
    missing = ~holders[ar, o.clamp(0, max(W - 1, 0))] & ~no_owner & ~out_of_range
    bad = no_owner | out_of_range | missing
    if E and bool(bad.any()):
        e = int(torch.nonzero(bad)[0])
        if bool(no_owner[e]):
            raise ValueError(f"Placement: expert {e} has no owner (owner[{e}]={int(o[e])})")
        if bool(out_of_range[e]):
            raise ValueError(f"Placement: expert {e}: owner rank {int(o[e])} out of range [0, {W})")
        hs = torch.nonzero(holders[e]).flatten().tolist()
        raise ValueError(
            f"Placement: expert {e}: holder set {hs} does not include its owner rank {int(o[e])}"
        )
    idx = torch.nonzero(holders.reshape(-1)).flatten()
    return o, idx // W, idx % W
