"""Dense parameters are sharded with PyTorch FSDP2 (`fully_shard`), layer by layer."""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard


def layers(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a model: the children of its ModuleLists (outermost first)."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            for child in mod:
                if id(child) not in seen and not _inside(child, seen, found):
                    found.append(child)
                    seen.add(id(child))
    return found


def _inside(child: nn.Module, seen: set[int], found: list[nn.Module]) -> bool:
    return any(child is m or any(child is s for s in m.modules()) for m in found)


def shard_dense(model: nn.Module) -> nn.Module:
    """fully_shard every layer that has parameters, then the root (which takes the rest)."""
    for layer in layers(model):
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model
