"""`python -m launch.generate <run dir>`: continue a prompt with the run's latest checkpoint.

Text in, text out with the run's tokenizer: bytes for `pystdlib`, the `tokenizer.json` of a
`launch.prepare_data` directory for `data=tokens`; runs on bare token files or synthetic data take
`--prompt-ids 1,2,3` and print ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from launch.errors import UserError, fail
from models.common.context import MoEContext


@torch.no_grad()
def generate(
    model: nn.Module, prompt_S: Tensor, new_tokens: int, temperature: float, seed: int
) -> Tensor:
    """Greedy (temperature 0) or sampled continuation; uses the model's cache when it has one."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache() if hasattr(model, "new_cache") else None
    tokens = prompt_S[None]
    step_in = tokens
    out = []
    for _ in range(new_tokens):
        logits = model(step_in, MoEContext(), cache) if cache is not None else model(tokens)
        last_V = logits[0, -1].double()
        if temperature <= 0:
            nxt = int(last_V.argmax())
        else:
            probs = torch.softmax(last_V / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        step_in = torch.tensor([[nxt]])
        tokens = torch.cat([tokens, step_in], dim=1)
    return torch.tensor(out, dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.generate", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--prompt-ids", default=None, help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=200, help="new tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = ap.parse_args(argv)
    from launch.consolidate import load_full_model
    from launch.data.tokenizer import run_codec

    try:
        model, cfg, step = load_full_model(args.run_dir, args.step)
        vocab = cfg.model.vocab_size
        codec = None if args.prompt_ids else run_codec(cfg)
        if args.prompt_ids:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        elif codec is not None:
            ids = codec.encode(args.prompt)
        else:
            raise UserError(
                f"the run's data ({cfg.data.name}) has no tokenizer: pass --prompt-ids 1,2,3"
            )
        if not ids or max(ids) >= vocab:
            raise UserError(f"prompt ids must be non-empty and < vocab size {vocab}")
        limit = getattr(cfg.model, "max_seq_len", None)
        if limit is not None and len(ids) + args.tokens > limit:
            raise UserError(f"prompt + --tokens exceeds the model's max_seq_len={limit}")
    except UserError as e:
        fail(str(e))
    out = generate(model, torch.tensor(ids), args.tokens, args.temperature, args.seed)
    print(f"[{args.run_dir} step {step}]", file=sys.stderr)
    if codec is None:
        print(",".join(str(t) for t in ids + out.tolist()))
    else:
        print(codec.decode(ids + out.tolist()))


if __name__ == "__main__":
    main()
