"""The global-batch sampler: the batch of step s is a pure function of (seed, s); ranks slice it."""

from __future__ import annotations

import numpy as np
import torch

from launch.data.config import DataConfig, DataError
from launch.data.streams import TokenStream

_M64 = (1 << 64) - 1
_VAL_SALT = 0x76616C  # "val": keeps validation windows independent of training windows


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers; stable across processes and machines (no builtin hash())."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _M64))
    return h >> 1


class GlobalBatchSampler:
    """Random windows of seq_len+1 tokens; inputs are window[:-1], targets window[1:] (int64)."""

    def __init__(
        self,
        stream: TokenStream,
        seed: int,
        global_batch: int,
        seq_len: int,
        rank: int,
        world_size: int,
        *,
        salt: int = 0,
    ) -> None:
        if global_batch < 1 or seq_len < 1:
            raise DataError(
                f"train.global_batch_size={global_batch} and train.seq_len={seq_len} "
                f"must both be >= 1: raise them"
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}: check torchrun args")
        if global_batch % world_size:
            raise DataError(
                f"train.global_batch_size={global_batch} is not divisible by world size "
                f"{world_size}: set it to a multiple of {world_size}"
            )
        if len(stream) < seq_len + 1:
            raise DataError(
                f"{stream.name} has {len(stream)} tokens, fewer than train.seq_len+1="
                f"{seq_len + 1}: lower train.seq_len or use more data"
            )
        self.stream, self.seed, self.salt = stream, seed, salt
        self.global_batch, self.seq_len = global_batch, seq_len
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` (identical on every rank)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.salt, step))
        high = len(self.stream) - self.seq_len  # last valid start is len - seq_len - 1
        return torch.randint(0, high, (self.global_batch,), generator=g).numpy()

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of step `step`: a pure function of (seed, step, rank, world size)."""
        b = self.global_batch // self.world_size
        starts = self.offsets(step)[self.rank * b : (self.rank + 1) * b]
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        win = torch.from_numpy(np.asarray(self.stream.tokens[idx], dtype=np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        # Rank and world size are left out on purpose: the state restores at any world size.
        return {
            "step": self.step,
            "seed": self.seed,
            "salt": self.salt,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "stream_tokens": len(self.stream),
        }

    def load_state_dict(self, sd: dict) -> None:
        # A resume with other data or batch settings would silently train on other batches.
        mine = self.state_dict()
        for key in ("seed", "salt", "global_batch", "seq_len", "stream_tokens"):
            if sd.get(key) != mine[key]:
                raise DataError(
                    f"data sampler checkpoint has {key}={sd.get(key)} but this run has "
                    f"{mine[key]}: resume with the checkpoint's seed, batch and data config"
                )
        self.step = int(sd["step"])


def val_batches(
    stream: TokenStream,
    cfg: DataConfig,
    seed: int,
    global_batch: int,
    seq_len: int,
    rank: int,
    world_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: cfg.val_batches global batches, this rank's slice of each."""
    if cfg.val_batches <= 0:
        return []
    s = GlobalBatchSampler(stream, seed, global_batch, seq_len, rank, world_size, salt=_VAL_SALT)
    return [s.batch_at(i) for i in range(cfg.val_batches)]
