"""`python -m launch.export <run dir> [--step N] [--out DIR]`: one safetensors file of the whole
model plus its config, loadable without torch.distributed.

Writes `DIR/model.safetensors` (every parameter and persistent buffer under the plain model's
names, in the dtype the run trained in), `DIR/config.yaml` (the run's config; `model:` is what
`models.registry.build_model` needs) and, for data made by `launch.prepare_data`, its
`DIR/tokenizer.json` (HF tokenizers: `tokenizers.Tokenizer.from_file`). `DIR` defaults to
`<run dir>/export`. Load it with `load_exported(DIR)` (a str or a Path), or by hand:

    model = build_model(load_run_config(DIR).model)
    model.load_state_dict(safetensors.torch.load_file(DIR / "model.safetensors"))
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from launch.errors import UserError, fail

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): clone the repeats."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def export(
    run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None
) -> Path:
    """Write the consolidated model of `run_dir`'s checkpoint (latest, or `step`); return DIR."""
    from launch.consolidate import load_full_model

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else None
    model, _, ckpt_step = load_full_model(run_dir, step)
    out_dir = out_dir or run_dir / "export"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": "fssdp-export-1", "step": str(ckpt_step), "run_dir": str(run_dir.resolve())}
    save_file(_untied(model.state_dict()), str(tmp / WEIGHTS), metadata=meta)
    shutil.copyfile(run_dir / "config.yaml", tmp / CONFIG)
    tok = _tokenizer_file(run_dir)
    if tok is not None:  # text in, text out without the data directory
        shutil.copyfile(tok, tmp / TOKENIZER)
    if out_dir.exists():  # replace a previous export only once the new one is complete
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _tokenizer_file(run_dir: Path) -> Path | None:
    """The tokenizer.json of the run's prepare_data directory, if it has one."""
    from omegaconf import OmegaConf

    from launch.data.meta import meta_file, read_meta

    cfg = OmegaConf.load(run_dir / "config.yaml")
    if OmegaConf.select(cfg, "data.name") != "tokens":
        return None
    found = meta_file(OmegaConf.select(cfg, "data.path"))
    if found is None:
        return None
    path = found.parent / read_meta(found).get("tokenizer", TOKENIZER)
    return path if path.is_file() else None


def load_exported(out_dir: str | Path) -> nn.Module:
    """The exported model on CPU in eval mode (no torch.distributed involved)."""
    from launch.consolidate import load_run_config
    from launch.trainer import param_dtype
    from models.registry import build_model

    out_dir = Path(out_dir)
    cfg = load_run_config(out_dir)
    model = build_model(cfg.model).to(param_dtype(cfg.train))
    model.load_state_dict(load_file(str(out_dir / WEIGHTS)))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (<run dir>/export)")
    args = ap.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.step)
    except UserError as e:
        fail(str(e))
    print(f"exported {out / WEIGHTS} and {out / CONFIG}", file=sys.stdout)


if __name__ == "__main__":
    main()
