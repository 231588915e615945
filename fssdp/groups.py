"""The side process groups of the FSSDP runtime, created once per default group.

[Note: why the groups are cached]
`dist.new_group` is collective and gloo groups hold sockets; a new pair per strategy object
means that when an old object is garbage-collected (at a different moment on each rank) its
groups shut down while the peers' twins still talk — seen as "Received data size doesn't
match" when several strategy objects were built in one process. So every strategy object in
a process shares the same two groups (see [Note: three process groups] in executor.py).
"""

from __future__ import annotations

import torch.distributed as dist

_GROUPS: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def side_groups() -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(sparse group, dispatch group); (None, None) at world size 1."""
    if dist.get_world_size() == 1:
        return None, None
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        backend = dist.get_backend()
        _GROUPS[key] = (dist.new_group(backend=backend), dist.new_group(backend=backend))
    return _GROUPS[key]
