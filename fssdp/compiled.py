"""`train.compile=true`: torch.compile of the dense submodules (attention, norms, dense FFNs).

The compiled modules are the largest submodules that hold no expert bank (and are not plain
embeddings, dropout or routers): in gpt_moe a block's `ln1`, `attn`, `ln2`; in jamba a whole
dense layer; the final norm and head. The expert path stays eager: its executors issue
collectives, count tokens and switch replicas in Python, which would break the graph at every
call, and its grouped GEMMs gain nothing from fusion. Each module's `forward` is replaced on the
instance, so parameter names (checkpoints, metrics), FSDP2's hooks on the enclosing units and
activation checkpointing around them are unchanged. Compilation happens at a module's first
call (the first step pays it); a new input shape (evaluation's batch) may recompile once.

Inductor on CPU builds C++ kernels: without a C++ compiler the first step would fail deep in a
traceback, so `compile_problem` is checked before any rank starts: one line instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.common.experts import ExpertBank
from models.common.router import Router

# Nothing to fuse (embeddings, dropout), or part of the expert path: routers are timed by the
# runtime's hooks (a Python clock, a graph break) and feed the executors' token counts.
_SKIP = (nn.Embedding, nn.Dropout, nn.Identity, Router)


def dense_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the largest submodules without an expert bank, depth first."""
    out: list[tuple[str, nn.Module]] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if any(isinstance(m, ExpertBank) for m in child.modules()):
                walk(child, f"{full}.")
            elif not isinstance(child, _SKIP) and any(True for _ in child.parameters()):
                out.append((full, child))

    walk(model, "")
    return out


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (its `CXX` override, else c++/g++/clang++)."""
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env)
    return next((p for c in ("c++", "g++", "clang++") if (p := shutil.which(c))), None)


def compile_problem(device_type: str) -> str | None:
    """Why `train.compile=true` cannot work on `device_type` here (one line naming the fix),
    or None. Checked before any rank starts (launch/validation.py)."""
    if device_type == "cpu" and _cxx_compiler() is None:
        return (
            "train.compile=true needs a C++ compiler on CPU (inductor builds C++ kernels) and "
            "none was found (c++, g++, clang++ or $CXX): install one (apt-get install g++) or "
            "use train.compile=false"
        )
    return None


# [Note: inductor cache per CPU capability]
# Inductor caches the C++ kernels it builds (TORCHINDUCTOR_CACHE_DIR, default
# /tmp/torchinductor_<user>) and reuses them across processes. Seen here (torch 2.13, AMD EPYC
# with AVX-512): kernels cached by a default run and reused by a run with
# ATEN_CPU_CAPABILITY=avx2 made the compiled model's first loss NaN; with a fresh cache both
# runs match eager. So, unless the user chose a cache directory, each CPU capability gets its own.
# (torch writes its default into the variable at first use, so the default counts as unset.)
def _cache_per_capability() -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    mine = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if mine and os.path.abspath(mine) != os.path.abspath(default_cache_dir()):
        return
    isa = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"cpu_{isa}")


def compile_dense(model: nn.Module) -> list[str]:
    """Compile every dense submodule of `model` in place; returns their names."""
    _cache_per_capability()
    chosen = dense_submodules(model)
    for _, module in chosen:
        module.forward = _compiled(module.forward)  # type: ignore[method-assign]
    return [name for name, _ in chosen]


def _compiled(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` compiled. Dynamo skips a frame inside torch.nn when it is the outermost one
    (`nn.LayerNorm.compile()` would run eager), so the compiled frame is this wrapper, which
    inlines the module's forward, built-in or ours."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    return torch.compile(run)
