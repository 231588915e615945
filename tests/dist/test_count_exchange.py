"""fssdp/counts.py on gloo ranks: an announced call's count matrix equals the synchronous one
(skewed, empty and all-to-one routings), announcements interleave with other banks' calls as
MoEUT's do, misuse is one clear error on every rank, and a recomputation announces nothing."""

from __future__ import annotations

import pytest
import torch

from tests.support.harness import run_distributed

E = 6


def _routings(rank: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    skewed = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 0.5, 0.5]), 40, True, generator=g)
    empty = torch.empty(0, dtype=torch.long) if rank % 2 else torch.randint(0, E, (7,), generator=g)
    return [skewed, empty, torch.full((13 + rank,), 3, dtype=torch.long)]


def _job(rank: int, world: int) -> dict[str, object]:
    from collectives.dispatch import all_gather_counts
    from fssdp.counts import CountExchange
    from fssdp.dispatch import CallStats, Exchange
    from fssdp.phases import NULL_TIMER
    from fssdp.recompute import Region, _active

    def exchange(name: str) -> CountExchange:
        ex = Exchange(None, rank, world, 30.0, name, NULL_TIMER, CallStats())
        return CountExchange(ex, E)

    v, o = exchange("v"), exchange("o")
    equal = []
    for ids_v in _routings(rank, world):
        ids_o = ids_v.flip(0)[: max(0, ids_v.numel() - 2)]
        o.announce(ids_o)  # as MoEUT: o's routing known before v's call
        got_v = v.gather(ids_v)  # synchronous, issued after o's announcement on every rank
        got_o = o.gather(ids_o)
        ref_v = all_gather_counts(torch.bincount(ids_v, minlength=E))
        ref_o = all_gather_counts(torch.bincount(ids_o, minlength=E))
        equal.append(torch.equal(got_v, ref_v) and torch.equal(got_o, ref_o))
    errors = []
    o.announce(torch.tensor([0, 1]))
    try:
        o.gather(torch.tensor([0, 2]))
    except RuntimeError as err:
        errors.append(str(err))
    o.announce(torch.tensor([1]))
    try:
        o.announce(torch.tensor([1]))
    except RuntimeError as err:
        errors.append(str(err))
    o.gather(torch.tensor([1]))
    region = Region("full")
    region.begin(replaying=True)
    with _active(region):
        o.announce(torch.tensor([2]))  # a recomputation: ignored, nothing issued
    quiet = o._announced is None
    after = o.gather(torch.tensor([2, 2]))  # the sequence of collectives still agrees
    return {
        "equal": equal,
        "errors": errors,
        "quiet": quiet,
        "after": after.tolist(),
        "early": o.announced_calls,
    }


@pytest.mark.parametrize("world", [1, 2, 4])
def test_announced_counts_equal_the_synchronous_ones(world: int) -> None:
    for rank, r in enumerate(run_distributed(_job, world)):
        assert r["equal"] == [True, True, True], rank
        mismatch, twice = r["errors"]
        assert "bank o: the call routes other rows than were announced" in mismatch
        assert "bank o: announced twice" in twice
        assert r["quiet"] and r["after"] == [[0, 0, 2, 0, 0, 0]] * world
        assert r["early"] == 3 + 1  # the three routings and the one after the double announce


def _train_job(rank: int, world: int, strategy: str) -> dict[str, int]:
    from tests.support.parity import train_capture

    def probe(trainer: object) -> dict[str, int]:
        counts = trainer.par.count_exchanges  # type: ignore[attr-defined]
        return {name: c.announced_calls for name, c in counts.items()}

    ov = ["model=moeut_tiny", f"parallel={strategy}", "train.activation_checkpointing=full"]
    return train_capture(rank, world, ov, 2, probe=probe)["probe"]


@pytest.mark.parametrize("strategy", ["ep", "fssdp"])
def test_training_uses_the_announcements(strategy: str) -> None:
    """MoEUT under ep/fssdp: every output-projection call found its counts issued early (2 steps
    x R = 2 repeats), also with full recomputation (which replays them); no other bank
    announces."""
    for probe in run_distributed(_train_job, 2, strategy):
        early = {b: n for b, n in probe.items() if b.endswith("attention.o")}
        assert len(early) == 2 and set(early.values()) == {2 * 2}, probe
        assert all(n == 0 for b, n in probe.items() if b not in early), probe
