"""`meta.json` of a token directory written by `python -m launch.prepare_data`.

`data=tokens data.path=DIR` reads DIR/train.bin and DIR/val.bin; the vocabulary size and the
token dtype come from DIR/meta.json, and so does `model.vocab_size` unless it is given (the
embedding then matches the tokenizer). An override that contradicts meta.json is one error line,
not a silent choice between the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launch.errors import UserError

META = "meta.json"
FORMAT = "fssdp-tokens-1"
TRAIN, VAL = "train.bin", "val.bin"


def meta_file(path: str | Path | None) -> Path | None:
    """DIR/meta.json for a directory that has one (or a path to a meta.json), else None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and (p / META).is_file():
        return p / META
    return p if p.name == META and p.is_file() else None


def read_meta(path: Path) -> dict[str, Any]:
    """The parsed meta.json; one line naming the file when it is not one."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path} cannot be read as JSON ({e}): run python -m launch.prepare_data again"
        ) from e
    missing = [k for k in ("vocab_size", "dtype", "files") if k not in meta]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or missing:
        raise UserError(
            f"{path} is not a launch.prepare_data meta.json (format {FORMAT}; missing "
            f"{', '.join(missing) or 'format'}): run python -m launch.prepare_data again"
        )
    return meta


def token_files(meta_path: Path) -> tuple[Path, Path]:
    """(train, val) token files named in a meta.json, relative to its directory."""
    meta = read_meta(meta_path)
    files = meta["files"]
    return meta_path.parent / files.get("train", TRAIN), meta_path.parent / files.get("val", VAL)


def _given(overrides: list[str]) -> set[str]:
    return {o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o}


def resolve_token_meta(cfg: Any, overrides: list[str]) -> None:
    """Fill data.vocab_size, data.token_dtype and (unless given) model.vocab_size from the
    meta.json of `data.path` (data=tokens); an override that contradicts it is a UserError."""
    from omegaconf import OmegaConf

    data = cfg.data
    if data.name != "tokens" or (found := meta_file(data.path)) is None:
        return
    meta, given = read_meta(found), _given(overrides)
    wanted = {"data.vocab_size": int(meta["vocab_size"]), "data.token_dtype": str(meta["dtype"])}
    for key, value in wanted.items():
        mine = OmegaConf.select(cfg, key)
        if key in given and mine != value:
            raise UserError(
                f"{key}={mine} contradicts {found} ({key.split('.')[1]} {value}): drop {key} "
                "(data=tokens takes it from meta.json), or prepare the data again"
            )
        OmegaConf.update(cfg, key, value)
    if "model.vocab_size" not in given:
        OmegaConf.update(cfg, "model.vocab_size", wanted["data.vocab_size"])
