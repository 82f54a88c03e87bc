"""Communication-domain names (the ``groupEp`` / ``groupTp`` strings of the operator).

On the NPU a group is named by an HCCL communicator string.  Here :func:`group_name`
gives every ``torch.distributed`` process group a stable name (the same on every member
rank, < 128 chars) and :func:`resolve_group` maps a name, or a group object, back.
"""
from __future__ import annotations

import functools
import hashlib
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed import distributed_c10d as c10d

from .context import OwnGroup, current

_PREFIX = "emu_hccl_"
_NAMED: dict[str, str] = {}           # torch's group name -> ours (a pure function of it)


class Departed(RuntimeError):
    """Members raised in this op call and will not come: ``farewells`` by global rank."""

    def __init__(self, farewells: dict[int, dict]):
        super().__init__(f"ranks {sorted(farewells)} left the op")
        self.farewells = farewells


def group_name(pg: ProcessGroup | None = None) -> str:
    """Stable name for ``pg`` (default: the world group); registers it for lookup.

    The registry keeps torch's own group name, never the object: a group object that
    outlives destroy_process_group() aborts the interpreter at exit."""
    pg = pg if pg is not None else dist.group.WORLD
    torch_name = pg.group_name
    names = current().group_names
    known = _NAMED.get(torch_name)
    if known is not None and names.get(known) == torch_name:
        return known
    short = torch_name
    if len(_PREFIX) + len(short) >= 100:
        short = hashlib.sha1(short.encode()).hexdigest()[:32]
    name = _PREFIX + short
    names[name] = torch_name
    _NAMED[torch_name] = name
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


def own_group(global_ranks: list[int], timeout_s: float, prefix: str) -> OwnGroup:
    """A gloo group of exactly ``global_ranks`` (sorted), built by those ranks alone, whose
    collectives give up after ``timeout_s``.  Returns it with its name and generation.

    Every collective of the emulator runs on such a group, never on the user's: a gloo thread
    stuck in a collective keeps its process from exiting until *its group's* timeout (30
    minutes by default for the user's groups), while these give up with EMU_TIMEOUT_S.  They
    also let the survivors of an elastic call talk without the removed ranks: ``new_group``
    waits for the whole world, and with ``use_local_synchronization=True`` its name hashes
    each process's count of groups, which differs between survivors with different histories.
    So the group is a bare ``ProcessGroupGloo`` over the default rendezvous store under a prefix
    that depends on the members only, created on first use (after every member has arrived,
    failing at once when one of them is gone), reused afterwards, and not registered with
    torch.distributed (collectives on it go through the backend object).

    A member that abandons a collective (a peer left, died or never came) abandons the group
    (:func:`abandon_group`): its generation moves on in the store and every member builds the
    next one on its next use, so a group left with a collective in flight is never reused.  A
    process whose last op call raised checks the generation of each group once before using it.
    """
    ctx = current()
    key = own_key(global_ranks, prefix)
    entry = _current(ctx, key)
    if entry is None:
        name, gen = own_generation(global_ranks, prefix)
        base = own_group_name(global_ranks, prefix)
        me = dist.get_rank()
        store = dist.PrefixStore(name + "/", c10d._get_default_store())
        _arrive(store, me, list(key[1:]), timeout_s)
        pg = dist.ProcessGroupGloo(store, key[1:].index(me), len(key) - 1, timedelta(seconds=timeout_s))
        entry = OwnGroup(pg, name, base, gen)
        ctx.bare_groups[key] = entry
    return entry


@functools.lru_cache(maxsize=4096)
def _key_of(members: tuple[int, ...], prefix: str) -> tuple:
    return (prefix,) + tuple(sorted(int(r) for r in members))


def own_key(global_ranks: list[int], prefix: str) -> tuple:
    """The registry key of the own group of ``global_ranks``: (prefix, sorted members)."""
    return _key_of(tuple(global_ranks), prefix)


def _current(ctx, key: tuple) -> OwnGroup | None:
    """The cached group of ``key`` unless a member abandoned it meanwhile (checked once after an
    op call of this process raised)."""
    entry = ctx.bare_groups.get(key)
    if entry is not None and ctx.suspect and key not in ctx.validated:
        ctx.validated.add(key)
        if _generation(entry.base) != entry.gen:
            _bury(ctx, key)
            return None
    return entry


def own_generation(global_ranks: list[int], prefix: str) -> tuple[str, int]:
    """(name, generation) of the own group of ``global_ranks``, without building it."""
    entry = _current(current(), own_key(global_ranks, prefix))
    if entry is not None:
        return entry.name, entry.gen
    base = own_group_name(global_ranks, prefix)
    gen = _generation(base)
    return (base if gen == 0 else f"{base}_g{gen}"), gen


def abandon_group(global_ranks: list[int], prefix: str) -> None:
    """This rank gave up on a collective of the own group of ``global_ranks``, which may still
    be in flight, or on setting the group up: move the group's generation on (once per
    generation, whoever comes first), and keep the object until exit (dropping it would wait for
    the collective)."""
    ctx = current()
    key = own_key(global_ranks, prefix)
    entry = ctx.bare_groups.get(key)
    base = own_group_name(global_ranks, prefix)
    gen = entry.gen if entry is not None else own_generation(global_ranks, prefix)[1]   # not built: set-up failed
    try:
        c10d._get_default_store().compare_set(_GEN + base, str(gen or ""), str(gen + 1))
    except RuntimeError:
        pass
    if entry is not None:
        _bury(ctx, key)


def _bury(ctx, key: tuple) -> None:
    """Keep an abandoned group until exit; its collective in flight may still write into the
    wire buffers it was given, so this process takes fresh ones."""
    ctx.graveyard.append(ctx.bare_groups.pop(key).pg)
    ctx.wire_buffers.clear()


_GEN = "emu_gen/"


def _generation(base: str) -> int:
    """The generation of the own group named ``base`` (0 until a member abandons it)."""
    store = c10d._get_default_store()
    try:
        return int(store.get(_GEN + base).decode() or 0) if store.check([_GEN + base]) else 0
    except (RuntimeError, ValueError):
        return 0


def own_group_name(global_ranks: list[int], prefix: str) -> str:
    """The name of the own group of ``global_ranks`` (any order), < 100 chars."""
    key = own_key(global_ranks, prefix)
    name = f"emu_{prefix}_" + "_".join(map(str, key))
    return name if len(name) < 100 else f"emu_{prefix}_" + hashlib.sha1(name.encode()).hexdigest()[:32]


def _arrive(store: dist.Store, me: int, members: list[int], timeout_s: float) -> None:
    """Wait until every member has arrived to build the group; raise at once when a missing
    member has left (its process is gone, or it raised), or after ``timeout_s``."""
    recorder = current().recorder
    store.set(f"arrived/{me}", "1")
    keys = [f"arrived/{r}" for r in members]
    start = time.monotonic()
    polls = 0
    while not store.check(keys):
        polls += 1
        if polls % 10 == 0:
            missing = [r for r in members if not store.check([f"arrived/{r}"])]
            left = {r: bye for r in missing if (bye := recorder.farewell_of(r, recorder.current)) is not None}
            if left:
                recorder.consume(left)
                raise Departed(left)
            gone = [r for r in missing if recorder.alive(r) is False]
            if gone:
                raise RuntimeError(f"rank {gone[0]} left before the group was set up")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"timed out after {timeout_s:g} s waiting for ranks {missing} to set up the group")
        time.sleep(0.01)
