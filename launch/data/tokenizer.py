"""Tokenizers (HF `tokenizers`) for `launch.prepare_data`, `launch.generate` and `launch.eval`.

`bytes` is a byte-level tokenizer whose ids are the byte values (vocab 256, what `pystdlib`
trains on, so bits per byte are exact); `bpe:<V>` trains a byte-level BPE of at most V ids on
the corpus, locally (nothing is downloaded), with `<|endoftext|>` between documents; a
`tokenizer.json` file is loaded as it is. Every prepared directory holds its tokenizer as
`tokenizer.json`, so generation decodes with exactly the tokenizer the data was made with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launch.errors import UserError

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte symbols and <|endoftext|>


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of tokenizers' ByteLevel."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer() -> Any:
    """ids = the UTF-8 bytes of the text (vocab 256), as a tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterator[str], vocab_size: int, length: int | None = None) -> Any:
    """A byte-level BPE of at most `vocab_size` ids trained on `texts` (fewer when the corpus
    has fewer distinct merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def parse_spec(spec: str) -> tuple[str, int | Path | None]:
    """`bytes` | `bpe:<V>` | a tokenizer.json path -> (kind, argument)."""
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or not MIN_BPE_VOCAB <= int(size) < 2**32:
            raise UserError(
                f"--tokenizer {spec}: the vocabulary size must be an integer ≥ {MIN_BPE_VOCAB} "
                "(256 bytes + <|endoftext|>), e.g. --tokenizer bpe:4096"
            )
        return "bpe", int(size)
    path = Path(spec)
    if not path.is_file():
        raise UserError(
            f"--tokenizer {spec}: not bytes, bpe:<vocab size> nor an existing tokenizer.json file"
        )
    return "file", path


def load(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise UserError(f"{path} is not a tokenizers tokenizer.json ({e})") from e


class TextCodec:
    """Text <-> ids for a run: exact bytes for byte-level data, else the HF tokenizer."""

    def __init__(self, tokenizer: Any | None, is_bytes: bool) -> None:
        self.tokenizer, self.is_bytes = tokenizer, is_bytes

    def encode(self, text: str) -> list[int]:
        if self.is_bytes:
            return list(text.encode("utf-8"))
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        if self.is_bytes:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def run_codec(cfg: Any) -> TextCodec | None:
    """The codec of a run's data: pystdlib bytes, a prepared directory's tokenizer.json, or
    None (a bare token file or synthetic data: ids only)."""
    from launch.data.meta import meta_file, read_meta

    if cfg.data.name == "pystdlib":
        return TextCodec(None, True)
    found = meta_file(cfg.data.path) if cfg.data.name == "tokens" else None
    if found is None:
        return None
    meta = read_meta(found)
    if meta.get("tokenizer_kind") == "bytes":
        return TextCodec(None, True)
    return TextCodec(load(found.parent / meta.get("tokenizer", "tokenizer.json")), False)
