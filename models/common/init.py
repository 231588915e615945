"""World-size invariant initialisation of a model built on the meta device.

[Note: sharded init]
The runtime builds every model on the meta device, shards it (FSDP2 DTensors for dense
parameters; each rank keeps only the rows of the experts it owns), calls `to_empty` and then
`init_weights`, which initialises only what each rank holds. Initial values must not depend on
the world size, the sharding, or the order modules were built in, so:
- a dense module's values depend only on (seed, module name): its `reset_parameters()` runs on
  full-size CPU shadows of its *direct* parameters and buffers ([Note: init protocol] in
  models/common/layers.py) under an RNG seeded from a stable hash of (seed, name); a `write`
  hook then copies each full shadow (or only the local shard of it) into the real tensor;
- an expert's values depend only on (seed, bank name, expert id): `bank.init_expert` runs on
  one expert's CPU shadows under an RNG seeded from (seed, bank name, expert id), for each row
  a rank holds.
Values are always drawn on CPU, so a GPU run starts from the same weights as a CPU run (in the
same dtype). Names are the module FQNs under the `model` given (a bank's `bank_name` when set).

Legend: E experts of a bank, O rows of a bank held here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from models.common.experts import ExpertBank

# write(dst, full_cpu): copy a full CPU tensor into a model tensor (or into its local shard)
Write = Callable[[Tensor, Tensor], None]
# expert_rows(bank) -> (name -> the [O, ...] rows held here, the O global expert ids)
ExpertRows = Callable[[ExpertBank], tuple[dict[str, Tensor], Sequence[int]]]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `repr(parts)` (stable across processes, unlike Python's `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global CPU RNG seeded with `seed` inside, restored afterwards. Only the CPU
    generator: `torch.manual_seed` would also re-seed every accelerator's generator (which
    fork_rng(devices=[]) does not restore) and, before CUDA starts, queue a lazy call with a
    stack trace each time, ~3 ms per module or expert."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def copy_write(dst: Tensor, full_cpu: Tensor) -> None:
    dst.copy_(full_cpu)


def local_expert_rows(bank: ExpertBank) -> tuple[dict[str, Tensor], Sequence[int]]:
    """The bank's own stacked parameters and the global ids of their rows."""
    ids = bank.expert_ids if bank.expert_ids is not None else range(bank.num_experts)
    return bank.stacked(), ids


@torch.no_grad()
def init_weights(
    model: nn.Module,
    seed: int,
    *,
    write: Write | None = None,
    expert_rows: ExpertRows | None = None,
) -> None:
    """Initialise every parameter and buffer of `model` in place ([Note: sharded init]).

    `write(dst, full_cpu)` stores a dense module's full-size CPU value into `dst` (default
    `dst.copy_(full_cpu)`; the runtime passes a hook that copies only a DTensor's local shard).
    `expert_rows(bank)` gives the rows a bank holds here and their global expert ids (default:
    its stacked parameters and `bank.expert_ids`, or all E).

    Peak extra memory: one module's direct parameters and buffers at full size, on CPU (e.g. an
    embedding table), plus one expert.
    """
    write = write or copy_write
    expert_rows = expert_rows or local_expert_rows
    for fqn, mod in model.named_modules():
        if isinstance(mod, ExpertBank):
            _init_bank(mod, mod.bank_name or _canonical(fqn), seed, expert_rows)
        else:
            _init_dense(mod, _canonical(fqn), seed, write)


def _canonical(fqn: str) -> str:
    """Drop the segments that torch's checkpoint / compile wrappers insert into module names."""
    skip = ("_checkpoint_wrapped_module", "_orig_mod")
    return ".".join(p for p in fqn.split(".") if p not in skip)


def _shadow(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of `shape`, NaN-filled so that an init that forgets a tensor is caught."""
    fill = math.nan if dtype.is_floating_point or dtype.is_complex else 0
    return torch.full(tuple(shape), fill, dtype=dtype, device="cpu")


def _init_dense(mod: nn.Module, name: str, seed: int, write: Write) -> None:
    params = {k: p for k, p in mod._parameters.items() if p is not None}
    buffers = {k: b for k, b in mod._buffers.items() if b is not None}
    if not params and not buffers:
        return
    reset = getattr(mod, "reset_parameters", None)
    if not callable(reset):
        raise TypeError(
            f"module {name or '<root>'} ({type(mod).__name__}) holds parameters or buffers but "
            "has no reset_parameters(): add one ([Note: init protocol] in models/common/layers.py)"
        )
    # full size: a DTensor's `.shape` is its global shape
    p_shadow = {
        k: nn.Parameter(_shadow(p.shape, p.dtype), requires_grad=p.requires_grad)
        for k, p in params.items()
    }
    b_shadow = {k: _shadow(b.shape, b.dtype) for k, b in buffers.items()}
    mod._parameters.update(p_shadow)
    mod._buffers.update(b_shadow)
    try:
        with seeded(stable_seed(seed, name)):
            reset()
    finally:
        mod._parameters.update(params)
        mod._buffers.update(buffers)
    for k, full in [*p_shadow.items(), *b_shadow.items()]:
        if full.dtype.is_floating_point and torch.isnan(full).any():
            raise ValueError(f"{name}.{k}: {type(mod).__name__}.reset_parameters() left it unset")
        write(params[k] if k in params else buffers[k], full.detach())


def _init_bank(bank: ExpertBank, name: str, seed: int, expert_rows: ExpertRows) -> None:
    rows, ids = expert_rows(bank)
    ids = list(ids)
    for k, v in rows.items():
        if v.shape[0] != len(ids):
            raise ValueError(f"bank {name}: {k} holds {v.shape[0]} rows for {len(ids)} expert ids")
    for i, e in enumerate(ids):
        one = {k: _shadow(v.shape[1:], v.dtype) for k, v in rows.items()}
        with seeded(stable_seed(seed, name, int(e))):
            bank.init_expert(one)
        for k, full in one.items():
            if full.dtype.is_floating_point and torch.isnan(full).any():
                raise ValueError(f"bank {name}: init_expert left {k} of expert {e} unset")
            rows[k][i].copy_(full)
