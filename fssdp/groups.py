"""The side process groups of the FSSDP runtime, created once per default group.

[Note: why the groups are cached]
`dist.new_group` is collective and gloo groups hold sockets; a new pair per strategy object
means that when an old object is garbage-collected (at a different moment on each rank) its
groups shut down while the peers' twins still talk — seen as "Received data size doesn't
match" when several strategy objects were built in one process. So every strategy object in
a process shares the same two groups ([Note: three process groups] in fssdp/executor.py). They
are keyed weakly by the default group object: `destroy_process_group()` ends them with it, and a
new default group (a test's next world, a restarted job) gets new ones.
"""

from __future__ import annotations

import weakref

import torch.distributed as dist

Groups = tuple[dist.ProcessGroup, dist.ProcessGroup]
# default group -> (sparse group, dispatch group)
_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, Groups] = weakref.WeakKeyDictionary()


def side_groups() -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(sparse group, dispatch group) of the current default group; (None, None) at world 1."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None, None
    world = dist.group.WORLD
    assert world is not None
    if world not in _GROUPS:
        backend = dist.get_backend()
        _GROUPS[world] = (dist.new_group(backend=backend), dist.new_group(backend=backend))
    return _GROUPS[world]
