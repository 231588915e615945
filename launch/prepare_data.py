"""`python -m launch.prepare_data --input <files, dirs, globs> --out DIR [--tokenizer SPEC]`:
text to the memmap token files that `data=tokens data.path=DIR` trains on.

SPEC is `bytes` (ids = UTF-8 bytes, vocab 256: bits per byte are exact), `bpe:<V>` (a byte-level
BPE of at most V ids trained here on the inputs with HF tokenizers; nothing is downloaded) or a
`tokenizer.json` file. DIR gets `train.bin` and `val.bin` (uint16, or uint32 past 65536 ids),
`tokenizer.json` and `meta.json` (vocab size, dtype, tokenizer, split, counts), which training
reads: no other data flag is needed. Split: the last --val-fraction of each file's tokens go to
val.bin (so one file is enough). Inputs are read in sorted order; a directory contributes every
file under it (hidden ones left out). DIR must not exist yet (or pass --overwrite): the output is
written to DIR.tmp and renamed into place once complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from launch.data import meta as M
from launch.data import tokenizer as T
from launch.errors import UserError, fail, os_error_line

CHUNK = 1 << 16  # characters per piece handed to encode_batch (split at a newline)


def is_text(path: Path) -> bool:
    """No NUL byte in the first 8 KiB (what git and grep call text)."""
    with open(path, "rb") as fh:
        return b"\0" not in fh.read(8192)


def find_inputs(specs: list[str]) -> list[Path]:
    """Files named, text files under directories named or matched by globs (binary files,
    __pycache__ and hidden ones left out); sorted, de-duplicated."""
    found: set[Path] = set()
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
                walked = (Path(root) / f for f in files if not f.startswith("."))
                found.update(f for f in walked if f.is_file() and is_text(f))
        else:
            matched = [Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file()]
            if not matched:
                raise UserError(f"--input {spec}: no such file or directory, and no file "
                                "matches it as a glob")  # fmt: skip
            found.update(m for m in matched if is_text(m))
    files = sorted(found)
    if not files:
        raise UserError(f"--input {' '.join(specs)}: no text files found (binary, hidden and "
                        "__pycache__ files are left out)")  # fmt: skip
    return files


def _pieces(text: str) -> list[str]:
    """`text` in pieces of about CHUNK characters, cut after a newline where there is one."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + CHUNK)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def encode_file(raw: bytes, kind: str, tok: Any) -> np.ndarray:
    """One document's ids (bytes: the bytes themselves; else the tokenizer's, then EOS)."""
    if kind == "bytes":
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    text = raw.decode("utf-8", errors="replace")
    ids = [i for enc in tok.encode_batch(_pieces(text)) for i in enc.ids]
    eos = tok.token_to_id(T.EOS)
    return np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64)


def _texts(files: list[Path]) -> Iterator[str]:
    for f in files:
        yield f.read_bytes().decode("utf-8", errors="replace")


def make_tokenizer(spec: str, files: list[Path]) -> tuple[str, Any]:
    kind, arg = T.parse_spec(spec)
    if kind == "bytes":
        return kind, T.byte_tokenizer()
    if kind == "bpe":
        print(f"training a byte-level BPE tokenizer (at most {arg} ids) on {len(files)} files",
              flush=True)  # fmt: skip
        return kind, T.train_bpe(_texts(files), int(arg), length=len(files))  # type: ignore[arg-type]
    return kind, T.load(arg)  # type: ignore[arg-type]


def write_tokens(
    files: list[Path], kind: str, tok: Any, out: Path, val_fraction: float, dtype: type
) -> dict[str, int]:
    """Encode every file into out/train.bin and out/val.bin, with a progress bar over bytes."""
    from tqdm import tqdm

    counts = {"files": len(files), "train_tokens": 0, "val_tokens": 0, "bytes": 0}
    total = sum(f.stat().st_size for f in files)
    with (
        open(out / M.TRAIN, "wb") as train_f,
        open(out / M.VAL, "wb") as val_f,
        tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stdout,
             mininterval=0.5 if sys.stdout.isatty() else 10) as bar,  # a log gets few lines
    ):
        for f in files:
            raw = f.read_bytes()
            ids = encode_file(raw, kind, tok)
            cut = len(ids) - int(np.ceil(len(ids) * val_fraction)) if len(ids) > 1 else len(ids)
            _write(train_f, ids[:cut], dtype)
            _write(val_f, ids[cut:], dtype)
            counts["train_tokens"] += cut
            counts["val_tokens"] += len(ids) - cut
            counts["bytes"] += len(raw)
            bar.update(len(raw))
    return counts


def _write(fh: BinaryIO, ids: np.ndarray, dtype: type) -> None:
    fh.write(ids.astype(dtype).tobytes())


def prepare(
    inputs: list[str], out: Path, spec: str = "bytes", val_fraction: float = 0.05,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write `out` (see the module docstring); returns its meta.json content."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: use a value in (0, 1), e.g. 0.05")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists: pass another --out, or --overwrite")
    files = find_inputs(inputs)
    kind, tok = make_tokenizer(spec, files)
    vocab = 256 if kind == "bytes" else int(tok.get_vocab_size(with_added_tokens=True))
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    counts = write_tokens(files, kind, tok, tmp, val_fraction, dtype)
    if counts["train_tokens"] < 2 or counts["val_tokens"] < 2:
        shutil.rmtree(tmp)
        raise UserError(
            f"{len(files)} input files gave {counts['train_tokens']} train / "
            f"{counts['val_tokens']} val tokens: give more text or a larger --val-fraction"
        )
    meta = {
        "format": M.FORMAT,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "tokenizer": "tokenizer.json",
        "tokenizer_kind": kind,
        "eos_id": None if kind == "bytes" else tok.token_to_id(T.EOS),
        "files": {"train": M.TRAIN, "val": M.VAL},
        "split": {"val_fraction": val_fraction, "rule": "the last val_fraction of each file"},
        "counts": counts,
        "inputs": [str(f) for f in files[:1000]],
    }
    (tmp / M.META).write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():  # --overwrite: replace only once the new output is complete
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m launch.prepare_data",
        description=__doc__.split("\n\n")[0],
        epilog="then: python -m launch.train data=tokens data.path=DIR",
    )
    ap.add_argument("--input", nargs="+", required=True, help="text files, directories or globs")
    ap.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    ap.add_argument("--tokenizer", default="bytes", help="bytes | bpe:<vocab size> | file.json")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="tail of each file (0.05)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.input, args.out, args.tokenizer, args.val_fraction, args.overwrite)
    except UserError as e:
        fail(str(e))
    except OSError as e:
        fail(os_error_line(e, f"cannot prepare {args.out}"))
    c = meta["counts"]
    print(
        f"wrote {args.out}: {c['train_tokens']:,} train + {c['val_tokens']:,} val tokens from "
        f"{c['files']} files ({c['bytes']:,} bytes; {meta['tokenizer_kind']} tokenizer, vocab "
        f"{meta['vocab_size']}, {meta['dtype']})\n"
        f"train on it: python -m launch.train data=tokens data.path={args.out}"
    )


if __name__ == "__main__":
    main()
