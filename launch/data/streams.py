"""Token streams: one 1-D array of token ids per split, built from a DataConfig."""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.data.config import DataConfig, DataError

_HINT = "(see README 'Data')"
# Left out of pystdlib: installed packages, caches, and the test suites (a third of the bytes,
# full of deliberately odd files: bad encodings, huge literals), which are not representative code.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_MAX_CHECK = 1_000_000  # tokens scanned for ids >= vocab_size (cheap; catches a wrong vocab)


@dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # 1-D integer ids; may be a read-only np.memmap
    vocab_size: int
    name: str = "stream"  # says where the tokens come from, for error messages and logs

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1:
            raise ValueError(f"TokenStream needs a 1-D array, got shape {self.tokens.shape}")

    def __len__(self) -> int:
        return len(self.tokens)


def build_streams(cfg: DataConfig) -> tuple[TokenStream, TokenStream]:
    """(train, val) streams for `cfg`; raises DataError on bad input before any heavy work."""
    loaders = {"pystdlib": load_pystdlib, "tokens": load_tokens, "synthetic": load_synthetic}
    if cfg.name not in loaders:
        raise DataError(f"data.name {cfg.name!r} is unknown: use data=pystdlib|tokens|synthetic")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} is outside [0, 1): pick e.g. 0.05")
    return loaders[cfg.name](cfg)


# --- pystdlib ---------------------------------------------------------------------------------


def _is_val(rel_path: str, val_fraction: float) -> bool:
    # crc32 is stable across processes and machines, unlike the salted builtin hash().
    return zlib.crc32(rel_path.encode()) / 2**32 < val_fraction


def pystdlib_files(
    root: str | None = None, val_fraction: float = 0.05
) -> tuple[list[str], list[str]]:
    """(train, val) sorted relative posix paths of the .py files under `root` (default: stdlib)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataError(f"pystdlib root '{base}' is not a directory: set data.path to one {_HINT}")
    rels = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rels += [(Path(dirpath) / f).relative_to(base).as_posix() for f in filenames]
    rels = sorted(r for r in rels if r.endswith(".py") and (base / r).is_file())
    val = [r for r in rels if _is_val(r, val_fraction)]
    train = [r for r in rels if not _is_val(r, val_fraction)]
    return train, val


@functools.lru_cache(maxsize=4)
def _pystdlib_arrays(root: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    # Cached per process: ~12 MB read in ~0.2 s, so no on-disk cache is needed.
    train, val = pystdlib_files(root, val_fraction)
    if not train or not val:
        raise DataError(
            f"pystdlib under '{root}' split into {len(train)} train / {len(val)} val files: "
            f"point data.path at a directory with more .py files or change data.val_fraction"
        )
    return _read_concat(root, train), _read_concat(root, val)


def _read_concat(root: str, rels: list[str]) -> np.ndarray:
    # frombuffer over bytes is read-only, so the cached array is safe to share.
    return np.frombuffer(b"".join((Path(root) / r).read_bytes() for r in rels), np.uint8)


def load_pystdlib(cfg: DataConfig) -> tuple[TokenStream, TokenStream]:
    root = str(Path(cfg.path or sysconfig.get_paths()["stdlib"]).resolve())
    train, val = _pystdlib_arrays(root, cfg.val_fraction)
    train_s = TokenStream(train, 256, f"pystdlib train ({root})")
    return train_s, TokenStream(val, 256, f"pystdlib val ({root})")


# --- tokens -----------------------------------------------------------------------------------


def _open_tokens(path: str | None, key: str, dtype: type) -> np.ndarray:
    fix = f"point {key} at a uint16/uint32 token file {_HINT}"
    if path is None:
        raise DataError(f"{key} is not set for data=tokens: {fix}")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key} '{path}' does not exist: {fix}")
    size, item = p.stat().st_size, np.dtype(dtype).itemsize
    if size == 0:
        raise DataError(f"{key} '{path}' is empty: {fix}")
    if size % item:
        raise DataError(
            f"{key} '{path}' has {size} bytes, not a multiple of {item}: "
            f"is data.token_dtype={np.dtype(dtype).name} right?"
        )
    return np.memmap(p, dtype=dtype, mode="r")


def _check_vocab(stream: TokenStream, key: str) -> None:
    head = np.asarray(stream.tokens[:_MAX_CHECK])
    if len(head) and int(head.max()) >= stream.vocab_size:
        raise DataError(
            f"{key} holds token id {int(head.max())} >= data.vocab_size={stream.vocab_size}: "
            f"set data.vocab_size to the tokenizer's vocabulary size (or check data.token_dtype)"
        )


def load_tokens(cfg: DataConfig) -> tuple[TokenStream, TokenStream]:
    if cfg.token_dtype not in _TOKEN_DTYPES:
        raise DataError(f"data.token_dtype {cfg.token_dtype!r} is unknown: use uint16 or uint32")
    dtype = _TOKEN_DTYPES[cfg.token_dtype]
    tokens = _open_tokens(cfg.path, "data.path", dtype)
    if cfg.val_path is not None:
        val_tokens = _open_tokens(cfg.val_path, "data.val_path", dtype)
        train = TokenStream(tokens, cfg.vocab_size, f"tokens train ({cfg.path})")
        val = TokenStream(val_tokens, cfg.vocab_size, f"tokens val ({cfg.val_path})")
    else:
        cut = len(tokens) - int(len(tokens) * cfg.val_fraction)
        train = TokenStream(tokens[:cut], cfg.vocab_size, f"tokens train ({cfg.path})")
        val = TokenStream(tokens[cut:], cfg.vocab_size, f"tokens val (tail of {cfg.path})")
    _check_vocab(train, "data.path")
    _check_vocab(val, "data.val_path" if cfg.val_path else "data.path")
    return train, val


# --- synthetic --------------------------------------------------------------------------------

_BRANCH = 8  # successors per previous token


def _distinct_rows(rng: np.random.Generator, rows: int, high: int, k: int) -> np.ndarray:
    """rows x k ints in [0, high), distinct within a row (rejection; O(rows*k), any `high`)."""
    out = rng.integers(0, high, (rows, k))
    while True:
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if not len(bad):
            return out
        out[bad] = rng.integers(0, high, (len(bad), k))


@functools.lru_cache(maxsize=4)
def _markov_tokens(vocab: int, n: int, seed: int) -> np.ndarray:
    """An order-2 Markov chain: token b has K candidate successors (order-1 structure, easy to
    learn), and the token before it, a, permutes their geometric probabilities (order-2 structure).
    H(x | a, b) ~ 2 bits, H(x | b) ~ log2 K, H(x) ~ log2 vocab."""
    rng = np.random.default_rng(seed)
    k = min(_BRANCH, vocab)
    cand = _distinct_rows(rng, vocab, vocab, k).ravel().tolist()
    perm = np.argsort(rng.random((vocab, k)), axis=1).ravel().tolist()
    p = 0.5 ** np.arange(k)
    picks = rng.choice(k, size=n, p=p / p.sum()).tolist()
    out, a, b = [0] * n, 0, 0
    for i, j in enumerate(picks):  # sequential by nature; ~0.3 s per 1M tokens
        a, b = b, cand[b * k + perm[a * k + j]]
        out[i] = b
    arr = np.array(out, dtype=np.uint16 if vocab <= 2**16 else np.uint32)
    arr.setflags(write=False)  # cached and shared
    return arr


def load_synthetic(cfg: DataConfig) -> tuple[TokenStream, TokenStream]:
    if cfg.vocab_size < 2 or cfg.synthetic_tokens < 2:
        raise DataError(
            f"data=synthetic needs data.vocab_size >= 2 and data.synthetic_tokens >= 2, "
            f"got {cfg.vocab_size} and {cfg.synthetic_tokens}: raise them"
        )
    n_val = int(cfg.synthetic_tokens * cfg.val_fraction / (1 - cfg.val_fraction))
    arr = _markov_tokens(cfg.vocab_size, cfg.synthetic_tokens + n_val, cfg.synthetic_seed)
    train, val = arr[: cfg.synthetic_tokens], arr[cfg.synthetic_tokens :]  # val continues the chain
    v = cfg.vocab_size
    return TokenStream(train, v, "synthetic train"), TokenStream(val, v, "synthetic val")
