"""Data layer: streams (pystdlib, tokens, synthetic) and the world-size-invariant sampler."""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data import (
    DataConfig,
    DataError,
    GlobalBatchSampler,
    TokenStream,
    build_streams,
    pystdlib_files,
    val_batches,
)
from launch.data.streams import _markov_tokens, _pystdlib_arrays

B, S = 8, 16


def ramp_stream(n: int = 100_000) -> TokenStream:
    # token i == i, so every window shows where it was cut from
    return TokenStream(np.arange(n, dtype=np.int64), n, "ramp")


def sampler(stream: TokenStream, rank: int = 0, world: int = 1, seed: int = 7, **kw):
    return GlobalBatchSampler(stream, seed, B, S, rank, world, **kw)


def global_batch(stream: TokenStream, world: int, step: int, seed: int = 7):
    parts = [sampler(stream, r, world, seed).batch_at(step) for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --- sampler ------------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_stream() -> None:
    x, y = sampler(ramp_stream()).batch_at(0)
    assert x.shape == y.shape == (B, S) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.equal(x, x[:, :1] + torch.arange(S))  # each row is one contiguous window
    assert len(set(x[:, 0].tolist())) > 1  # rows are different windows


def test_determinism() -> None:
    stream = ramp_stream()
    a, b = sampler(stream), sampler(stream)
    for step in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.batch_at(step), b.batch_at(step)))
    assert not torch.equal(a.batch_at(0)[0], a.batch_at(1)[0])
    assert not torch.equal(a.batch_at(0)[0], sampler(stream, seed=8).batch_at(0)[0])
    nexts = [a.next()[0] for _ in range(3)]  # next() walks batch_at(0), batch_at(1), ...
    assert all(torch.equal(n, a.batch_at(i)[0]) for i, n in enumerate(nexts))


def test_offsets_cover_whole_stream_including_last_window() -> None:
    stream = ramp_stream(S + 3)  # only 3 possible windows
    s = GlobalBatchSampler(stream, 0, 64, S, 0, 1)
    assert set(s.offsets(0).tolist()) == {0, 1, 2}


def test_world_size_invariance() -> None:
    stream = ramp_stream()
    for step in (0, 5):
        x1, y1 = global_batch(stream, 1, step)
        for world in (2, 4, 8):
            xw, yw = global_batch(stream, world, step)
            assert torch.equal(xw, x1) and torch.equal(yw, y1)


def test_state_dict_round_trip_across_world_sizes() -> None:
    stream = ramp_stream()
    orig = sampler(stream, rank=0, world=2)
    for _ in range(3):
        orig.next()
    sd = orig.state_dict()
    assert sd["step"] == 3
    twin = sampler(stream, rank=1, world=4)
    for _ in range(3):
        twin.next()
    assert twin.state_dict() == sd  # the state does not depend on rank or world size
    new = sampler(stream, rank=1, world=4)
    new.load_state_dict(sd)
    x, y = new.next()
    x1, y1 = global_batch(stream, 1, 3)
    assert torch.equal(x, x1[2:4]) and torch.equal(y, y1[2:4])
    assert torch.equal(orig.next()[0], x1[0:4])
    assert new.state_dict()["step"] == 4


def test_load_state_dict_refuses_other_settings() -> None:
    stream = ramp_stream()
    sd = sampler(stream).state_dict()
    with pytest.raises(DataError, match="seed"):
        sampler(stream, seed=8).load_state_dict(sd)
    with pytest.raises(DataError, match="stream_tokens"):
        sampler(ramp_stream(50_000)).load_state_dict(sd)


def test_sampler_rejects_bad_settings() -> None:
    stream = ramp_stream()
    with pytest.raises(DataError, match="global_batch_size=8 is not divisible by world size 3"):
        sampler(stream, rank=0, world=3)
    with pytest.raises(DataError, match="rank 2"):
        sampler(stream, rank=2, world=2)
    with pytest.raises(DataError, match="fewer than train.seq_len"):
        sampler(ramp_stream(S))


def test_val_batches_fixed_sliced_and_apart_from_train() -> None:
    stream, cfg = ramp_stream(), DataConfig(val_batches=3)
    full = val_batches(stream, cfg, 7, B, S, 0, 1)
    assert len(full) == 3 and not torch.equal(full[0][0], full[1][0])
    halves = [val_batches(stream, cfg, 7, B, S, r, 2) for r in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), full[i][0])
    assert not torch.equal(full[0][0], sampler(stream).batch_at(0)[0])
    assert val_batches(stream, DataConfig(val_batches=0), 7, B, S, 0, 1) == []


# --- pystdlib -----------------------------------------------------------------------------------


def test_pystdlib_real_corpus() -> None:
    train, val = build_streams(DataConfig())
    assert train.vocab_size == val.vocab_size == 256 and train.tokens.dtype == np.uint8
    assert len(train) > 1_000_000 and len(val) > 10_000
    train_files, val_files = pystdlib_files()
    assert train_files == sorted(train_files) and val_files
    assert not set(train_files) & set(val_files)
    assert not any(p.startswith(("site-packages/", "test/")) for p in train_files + val_files)
    assert all(zlib.crc32(p.encode()) / 2**32 < 0.05 for p in val_files)
    _pystdlib_arrays.cache_clear()  # a second, uncached load gives the same bytes
    train2, val2 = build_streams(DataConfig())
    assert train2.tokens is not train.tokens
    assert np.array_equal(train2.tokens, train.tokens) and np.array_equal(val2.tokens, val.tokens)


def test_pystdlib_split_and_order(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text(f"<{i}>")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skip.py").write_text("<tests>")
    (tmp_path / "notes.txt").write_text("<txt>")
    train_files, val_files = pystdlib_files(str(tmp_path), 0.5)
    assert sorted(train_files + val_files) == [f"m{i:02d}.py" for i in range(40)]
    assert train_files and val_files and not set(train_files) & set(val_files)
    train, val = build_streams(DataConfig(path=str(tmp_path), val_fraction=0.5))
    read = lambda files: b"".join((tmp_path / f).read_bytes() for f in files)
    assert train.tokens.tobytes() == read(train_files)  # sorted order, files back to back
    assert val.tokens.tobytes() == read(val_files)
    with pytest.raises(DataError, match="0 val files"):
        build_streams(DataConfig(path=str(tmp_path), val_fraction=0.0))


# --- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_tokens_round_trip(tmp_path: Path, dtype: str) -> None:
    vocab = 60_000 if dtype == "uint16" else 100_000
    data = np.random.default_rng(0).integers(0, vocab, 2000).astype(dtype)
    data[0] = vocab - 1  # the largest id is legal
    path = tmp_path / "train.bin"
    data.tofile(path)
    cfg = DataConfig(name="tokens", path=str(path), token_dtype=dtype, vocab_size=vocab)
    train, val = build_streams(cfg)
    assert train.vocab_size == vocab and len(train) == 1900 and len(val) == 100
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), data)
    x, y = GlobalBatchSampler(train, 0, 4, 10, 0, 1).batch_at(0)
    start = int(np.flatnonzero(train.tokens[:-10] == x[0, 0].item())[0])
    assert x[0].tolist() == data[start : start + 10].tolist()  # values survive int64 conversion
    val_file = tmp_path / "val.bin"
    data[:300].tofile(val_file)
    _, val = build_streams(DataConfig(**{**cfg.__dict__, "val_path": str(val_file)}))
    assert np.array_equal(val.tokens, data[:300])
    assert len(build_streams(DataConfig(**{**cfg.__dict__, "val_path": str(val_file)}))[0]) == 2000


def test_tokens_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.bin"
    with pytest.raises(DataError, match=f"data.path '{missing}' does not exist") as err:
        build_streams(DataConfig(name="tokens", path=str(missing)))
    assert "\n" not in str(err.value) and "data.path" in str(err.value)
    with pytest.raises(DataError, match="data.path is not set"):
        build_streams(DataConfig(name="tokens"))
    short = tmp_path / "short.bin"
    np.arange(10, dtype=np.uint16).tofile(short)
    train, _ = build_streams(DataConfig(name="tokens", path=str(short), val_fraction=0.0))
    with pytest.raises(DataError, match=r"has 10 tokens, fewer than train.seq_len\+1=17"):
        GlobalBatchSampler(train, 0, 2, 16, 0, 1)
    with pytest.raises(DataError, match="token id 9 >= data.vocab_size=5"):
        build_streams(DataConfig(name="tokens", path=str(short), vocab_size=5))
    np.arange(9, dtype=np.uint16).tofile(tmp_path / "odd.bin")  # 18 bytes
    with pytest.raises(DataError, match="has 18 bytes, not a multiple of 4"):
        build_streams(
            DataConfig(name="tokens", path=str(tmp_path / "odd.bin"), token_dtype="uint32")
        )
    (tmp_path / "odd3.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="not a multiple of 2"):
        build_streams(DataConfig(name="tokens", path=str(tmp_path / "odd3.bin")))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        build_streams(DataConfig(name="tokens", path=str(tmp_path / "empty.bin")))
    with pytest.raises(DataError, match="token_dtype 'int8'"):
        build_streams(DataConfig(name="tokens", path=str(short), token_dtype="int8"))
    with pytest.raises(DataError, match="data.name 'wiki'"):
        build_streams(DataConfig(name="wiki"))


# --- synthetic ----------------------------------------------------------------------------------


def cond_entropy_bits(x: np.ndarray, order: int, vocab: int) -> float:
    """Plug-in estimate of H(x_t | previous `order` tokens), in bits."""
    ctx = np.zeros(len(x) - order, dtype=np.int64)
    for k in range(order):
        ctx = ctx * vocab + x[k : len(x) - order + k]
    joint = np.unique(ctx * vocab + x[order:], return_counts=True)[1]
    marg = np.unique(ctx, return_counts=True)[1]
    h = lambda c: -(c / c.sum() * np.log2(c / c.sum())).sum()
    return float(h(joint) - h(marg))


def test_synthetic_deterministic_with_structure() -> None:
    cfg = DataConfig(name="synthetic", vocab_size=64, synthetic_tokens=300_000)
    train, val = build_streams(cfg)
    assert train.vocab_size == 64 and len(train) == 300_000 and len(val) > 10_000
    assert int(train.tokens.max()) < 64 and len(np.unique(train.tokens)) == 64
    _markov_tokens.cache_clear()
    assert np.array_equal(build_streams(cfg)[0].tokens, train.tokens)
    other = build_streams(DataConfig(**{**cfg.__dict__, "synthetic_seed": 1}))[0]
    assert not np.array_equal(other.tokens, train.tokens)
    x = train.tokens.astype(np.int64)
    h0, h1, h2 = (cond_entropy_bits(x, k, 64) for k in range(3))
    assert h0 > 5.5  # near log2(64) = 6: tokens are spread over the vocabulary
    assert h1 < 3.2  # order-1 structure: 8 successors per token
    assert h2 < 2.2 and h1 - h2 > 0.5  # order-2 structure on top
    iid = np.random.default_rng(0).integers(0, 64, len(x))
    assert cond_entropy_bits(iid, 2, 64) > 5.0  # the estimator itself is not biased that low


def test_synthetic_large_vocab() -> None:
    train, _ = build_streams(
        DataConfig(name="synthetic", vocab_size=100_000, synthetic_tokens=1000)
    )
    assert train.tokens.dtype == np.uint32 and int(train.tokens.max()) < 100_000


def test_token_ids_are_checked_over_the_whole_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad id past the first million tokens (the old prefix check) is found, vectorised and
    cached by the file's identity (path, size, mtime) in ~/.cache/fssdp."""
    from launch.data import streams

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(streams, "_SCAN_CHUNK", 1 << 16)  # several chunks in a small file
    data = np.zeros(1_500_000, dtype=np.uint16)
    data[1_234_567] = 500
    path = tmp_path / "train.bin"
    data.tofile(path)
    cfg = DataConfig(name="tokens", path=str(path), vocab_size=256)
    with pytest.raises(
        DataError, match=r"token id 500 >= data.vocab_size=256 \(first at token 1234567\)"
    ):
        build_streams(cfg)
    cache = json.loads((tmp_path / "cache" / "fssdp" / "token_max.json").read_text())
    assert list(cache.values()) == [500]
    ident = next(iter(cache))
    (tmp_path / "cache" / "fssdp" / "token_max.json").write_text(json.dumps({ident: 7}))
    streams._MAX_IDS.clear()
    build_streams(cfg)  # the cached verdict is trusted while the file is the same file
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="token id 500"):  # a changed file is scanned again
        build_streams(cfg)


def test_unreadable_token_files_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root nothing is unreadable: the open is patched to fail as it does for other users."""
    from launch.data import streams

    path = tmp_path / "train.bin"
    np.arange(100, dtype=np.uint16).tofile(path)

    def denied(p: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr(streams.np, "memmap", denied)
    with pytest.raises(DataError) as err:
        build_streams(DataConfig(name="tokens", path=str(path)))
    line = str(err.value)
    assert f"data.path cannot be read ({path}: Permission denied [EACCES])" in line
    assert "\n" not in line
    with pytest.raises(DataError, match="is a directory, not a token file"):
        build_streams(DataConfig(name="tokens", path=str(tmp_path)))


def test_unreadable_pystdlib_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text(f"<{i}>")
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name == "m07.py":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    _pystdlib_arrays.cache_clear()
    with pytest.raises(DataError, match=r"m07.py: Permission denied \[EACCES\]\): fix its"):
        build_streams(DataConfig(path=str(tmp_path), val_fraction=0.5))
    _pystdlib_arrays.cache_clear()
