"""Training data: token streams (pystdlib, tokens, synthetic) and the world-size-invariant sampler.

The global batch of step s is a pure function of (seed, s); rank r of W takes rows
[r*B/W, (r+1)*B/W). So the loss is the same for any world size (what the parity tests check)
and a sampler state saved at one world size restores at any other.
"""

from launch.data.config import DataConfig, DataError
from launch.data.sampler import GlobalBatchSampler, mix_seed, val_batches
from launch.data.streams import (
    TokenStream,
    build_streams,
    load_pystdlib,
    load_synthetic,
    load_tokens,
    pystdlib_files,
)

__all__ = [
    "DataConfig",
    "DataError",
    "GlobalBatchSampler",
    "TokenStream",
    "build_streams",
    "load_pystdlib",
    "load_synthetic",
    "load_tokens",
    "mix_seed",
    "pystdlib_files",
    "val_batches",
]
