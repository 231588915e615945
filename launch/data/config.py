"""Data config (registered in hydra's ConfigStore as group `data`) and the one data error type."""

from dataclasses import dataclass

from fssdp.rules import at_least, between, one_of


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem and the fix."""


@dataclass
class DataConfig:
    # pystdlib: this Python's standard library .py files as bytes (vocab 256, no download);
    # tokens: pre-tokenized binary file(s); synthetic: a seeded Markov chain that can be learned.
    name: str = "pystdlib"
    # tokens: a launch.prepare_data directory (train.bin, val.bin, meta.json: vocab and dtype
    # from it) or a train file (raw uint16/uint32 tokens, read with np.memmap);
    # pystdlib: optional root directory to read .py files from instead of the stdlib.
    path: str | None = None
    val_path: str | None = None  # tokens: val file; else the last val_fraction of `path`
    token_dtype: str = "uint16"  # tokens: uint16 | uint32 (from meta.json when there is one)
    vocab_size: int = 256  # tokens (from meta.json when there is one)/synthetic; pystdlib: 256
    val_fraction: float = 0.05  # pystdlib: share of files; tokens/synthetic: tail of the stream
    val_batches: int = 4  # fixed validation batches (of global batch size) to evaluate
    synthetic_tokens: int = 1_000_000  # synthetic: train stream length (val is extra)
    synthetic_seed: int = 1234  # synthetic: the dataset's own seed, independent of the run seed


# Checked by launch/validation.py before any rank starts; each rule's `bad` value is tested.
# (data.path / data.val_path are checked when the files are opened.)
RULES = (
    one_of("name", ("pystdlib", "tokens", "synthetic"), "e.g. data=pystdlib"),
    one_of("token_dtype", ("uint16", "uint32")),
    at_least("vocab_size", 2, "set {key} to the tokenizer's vocabulary size"),
    between("val_fraction", 0, 1, "e.g. {key}=0.05", hi_open=True),
    at_least("val_batches", 0, "e.g. {key}=4", note="0 = no validation"),
    at_least("synthetic_tokens", 2, "e.g. {key}=1000000"),
    at_least("synthetic_seed", 0, "e.g. {key}=1234"),
)
