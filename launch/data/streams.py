"""Token streams: one 1-D array of token ids per split, built from a DataConfig."""

from __future__ import annotations

import functools
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.data.config import DataConfig, DataError
from launch.errors import os_error_text

_HINT = "(see README 'Data')"
# Left out of pystdlib: installed packages, caches, and the test suites (a third of the bytes,
# full of deliberately odd files: bad encodings, huge literals), which are not representative code.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SCAN_CHUNK = 1 << 24  # tokens per np.max over a token file (the whole file is checked)
_MAX_IDS: dict[str, int] = {}  # file identity -> its largest token id (this process)
_CACHE_ENTRIES = 256  # files remembered in ~/.cache/fssdp/token_max.json


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
    parts = []
    for r in rels:
        try:
            parts.append((Path(root) / r).read_bytes())
        except OSError as e:
            raise DataError(
                f"pystdlib file cannot be read ({os_error_text(e)}): fix its permissions or point "
                f"data.path at another directory {_HINT}"
            ) from e
    return np.frombuffer(b"".join(parts), np.uint8)


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
    if p.is_dir():
        raise DataError(
            f"{key} '{path}' is a directory, not a token file, and has no meta.json of "
            f"python -m launch.prepare_data: {fix}, or at a prepare_data output directory"
        )
    if not p.is_file():
        raise DataError(f"{key} '{path}' does not exist: {fix}")
    try:
        size, item = p.stat().st_size, np.dtype(dtype).itemsize
        if size == 0:
            raise DataError(f"{key} '{path}' is empty: {fix}")
        if size % item:
            raise DataError(
                f"{key} '{path}' has {size} bytes, not a multiple of {item}: "
                f"is data.token_dtype={np.dtype(dtype).name} right?"
            )
        return np.memmap(p, dtype=dtype, mode="r")
    except OSError as e:  # unreadable (permissions), a stale NFS handle, an I/O error
        raise DataError(f"{key} cannot be read ({os_error_text(e)}): {fix}") from e


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fssdp" / "token_max.json"


def _max_token(tokens: np.ndarray, path: str) -> int:
    """The largest id in the whole file, vectorised in chunks; cached by the file's identity
    (path, size, mtime) in this process and in ~/.cache/fssdp, so a run pays it once per file."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{tokens.dtype}"
    if ident in _MAX_IDS:
        return _MAX_IDS[ident]
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(ident), int):
        _MAX_IDS[ident] = known[ident]
        return known[ident]
    top = max(int(tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK))
    _MAX_IDS[ident] = known[ident] = top
    known = dict(list(known.items())[-_CACHE_ENTRIES:])  # newest last; bounded
    try:  # best effort: another rank may write it at the same time (last one wins, same value)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass
    return top


def _check_vocab(tokens: np.ndarray, path: str, key: str, vocab: int) -> None:
    top = _max_token(tokens, path)
    if top < vocab:
        return
    first = next(
        i + int(np.argmax(tokens[i : i + _SCAN_CHUNK] >= vocab))
        for i in range(0, len(tokens), _SCAN_CHUNK)
        if (tokens[i : i + _SCAN_CHUNK] >= vocab).any()
    )
    raise DataError(
        f"{key} holds token id {top} >= data.vocab_size={vocab} (first at token {first}): set "
        f"data.vocab_size to the tokenizer's vocabulary size (or check data.token_dtype)"
    )


def load_tokens(cfg: DataConfig) -> tuple[TokenStream, TokenStream]:
    """A token file (data.path, data.val_path), or a launch.prepare_data directory: its
    train.bin and val.bin (vocab size and dtype from its meta.json: launch/data/meta.py)."""
    from launch.data.meta import meta_file, token_files

    if cfg.token_dtype not in _TOKEN_DTYPES:
        raise DataError(f"data.token_dtype {cfg.token_dtype!r} is unknown: use uint16 or uint32")
    dtype = _TOKEN_DTYPES[cfg.token_dtype]
    path, val_path = cfg.path, cfg.val_path
    if (meta := meta_file(path)) is not None:
        train_file, val_file = token_files(meta)
        path, val_path = str(train_file), val_path or str(val_file)
    tokens = _open_tokens(path, "data.path", dtype)
    if val_path is not None:
        val_tokens = _open_tokens(val_path, "data.val_path", dtype)
        train = TokenStream(tokens, cfg.vocab_size, f"tokens train ({path})")
        val = TokenStream(val_tokens, cfg.vocab_size, f"tokens val ({val_path})")
    else:
        cut = len(tokens) - int(len(tokens) * cfg.val_fraction)
        train = TokenStream(tokens[:cut], cfg.vocab_size, f"tokens train ({path})")
        val = TokenStream(tokens[cut:], cfg.vocab_size, f"tokens val (tail of {path})")
    _check_vocab(tokens, str(path), "data.path", cfg.vocab_size)  # the whole file, once
    if val_path is not None:
        _check_vocab(val.tokens, val_path, "data.val_path", cfg.vocab_size)
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
