"""Data config (registered in hydra's ConfigStore as group `data`) and the one data error type."""

from dataclasses import dataclass


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem and the fix."""


@dataclass
class DataConfig:
    # pystdlib: this Python's standard library .py files as bytes (vocab 256, no download);
    # tokens: pre-tokenized binary file(s); synthetic: a seeded Markov chain that can be learned.
    name: str = "pystdlib"
    # tokens: train file (raw uint16/uint32 tokens, read with np.memmap);
    # pystdlib: optional root directory to read .py files from instead of the stdlib.
    path: str | None = None
    val_path: str | None = None  # tokens: val file; else the last val_fraction of `path`
    token_dtype: str = "uint16"  # tokens: uint16 | uint32
    vocab_size: int = 256  # tokens/synthetic (pystdlib is bytes: always 256)
    val_fraction: float = 0.05  # pystdlib: share of files; tokens/synthetic: tail of the stream
    val_batches: int = 4  # fixed validation batches (of global batch size) to evaluate
    synthetic_tokens: int = 1_000_000  # synthetic: train stream length (val is extra)
    synthetic_seed: int = 1234  # synthetic: the dataset's own seed, independent of the run seed
