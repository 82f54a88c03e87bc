"""Communication-domain names (the ``groupEp`` / ``groupTp`` strings of the operator).

On the NPU a group is named by an HCCL communicator string.  Here :func:`group_name`
gives every ``torch.distributed`` process group a stable name (the same on every member
rank, < 128 chars) and :func:`resolve_group` maps a name, or a group object, back.
"""
from __future__ import annotations

import hashlib
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed import distributed_c10d as c10d

from .context import current

_PREFIX = "emu_hccl_"


def group_name(pg: ProcessGroup | None = None) -> str:
    """Stable name for ``pg`` (default: the world group); registers it for lookup.

    The registry keeps torch's own group name, never the object: a group object that
    outlives destroy_process_group() aborts the interpreter at exit."""
    pg = pg if pg is not None else dist.group.WORLD
    torch_name = pg.group_name
    if len(_PREFIX) + len(torch_name) >= 100:
        torch_name = hashlib.sha1(torch_name.encode()).hexdigest()[:32]
    name = _PREFIX + torch_name
    current().group_names[name] = pg.group_name
    return name


def resolve_group(group: ProcessGroup | str | None) -> ProcessGroup | None:
    """A ProcessGroup for ``group`` (object, registered name, or torch's own group name).

    Returns None when the name is unknown.
    """
    if group is None:
        return None
    if isinstance(group, ProcessGroup):
        return group
    wanted = current().group_names.get(group, group[len(_PREFIX):] if group.startswith(_PREFIX) else group)
    for pg, name in c10d._world.pg_names.items():
        if name == wanted:
            return pg
    return None


def group_label(group: ProcessGroup | str | None) -> str:
    """The name string the operator would see for ``group`` ("" for None)."""
    if group is None:
        return ""
    if isinstance(group, ProcessGroup):
        return group_name(group)
    return str(group)


def group_ranks(pg: ProcessGroup) -> list[int]:
    """Global ranks of ``pg``'s members, in group-rank order."""
    return dist.get_process_group_ranks(pg)


def survivor_group(global_ranks: list[int], timeout_s: float, prefix: str = "survivors") -> tuple[ProcessGroup, str]:
    """A gloo group of exactly ``global_ranks`` (sorted), built by those ranks alone.

    Survivors of an elastic call cannot use ``new_group``: it waits for the whole world, and
    with ``use_local_synchronization=True`` its name hashes each process's count of existing
    groups, which differs between survivors with different histories (they then wait on
    different keys forever).  So the group is a bare ``ProcessGroupGloo`` over the default
    rendezvous store under a prefix that depends on the members only; it is created on first
    use, reused afterwards, and not registered with torch.distributed (collectives on it go
    through the backend object).  Returns (group, name).
    """
    groups = current().bare_groups
    key = (prefix,) + tuple(sorted(int(r) for r in global_ranks))
    if key not in groups:
        name = f"emu_{prefix}_" + "_".join(map(str, key))
        if len(name) >= 100:
            name = f"emu_{prefix}_" + hashlib.sha1(name.encode()).hexdigest()[:32]
        me = dist.get_rank()
        store = dist.PrefixStore(name + "/", c10d._get_default_store())
        pg = dist.ProcessGroupGloo(store, key[1:].index(me), len(key) - 1, timedelta(seconds=timeout_s))
        groups[key] = (pg, name)
    return groups[key]
