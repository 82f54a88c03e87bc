"""Turning the watch on (``emu.watch()``, ``EMU_WATCH``, ``EMU_JITTER_MS``) and the group an
emulator op is watched on.  The watch itself is :mod:`emu.debug.watch`."""
from __future__ import annotations

import os
from functools import partial

import torch.distributed as dist

from ..core.checks import usable_remap
from ..core.request import Request
from ..debug.watch import Jitter, Watcher
from .context import CommContext, current
from .groups import group_name, resolve_group


def watch(strict: bool = False) -> Watcher:
    """Watch every collective of this process from now on (``strict``: check each across its
    group first and raise at the first divergence); returns the watcher."""
    ctx = current()
    if ctx.watcher is None:
        ctx.watcher = Watcher(strict, ctx.recorder, group_name, ctx.jitter, partial(_trace_dir, ctx))
        ctx.watcher.install()
    ctx.watcher.strict = strict
    return ctx.watcher


def _trace_dir(ctx: CommContext) -> str | None:
    tracer = ctx.trace_sink() if dist.is_initialized() else None
    return tracer.directory if tracer is not None else None


def unwatch() -> None:
    """Stop watching (torch.distributed's collectives are unwrapped)."""
    ctx = current()
    if ctx.watcher is not None:
        ctx.watcher.uninstall()
        ctx.watcher = None


def set_jitter(ms: float, seed: int = 0) -> None:
    """Delay each collective of this rank by a random 0..``ms`` ms (seeded by ``seed`` and the
    rank) from now on, or stop delaying (``ms`` 0); like EMU_JITTER_MS / EMU_JITTER_SEED.
    User collectives are delayed only while watched (``watch()``)."""
    ctx = current()
    ctx.jitter = Jitter(ms, seed) if ms > 0 else None
    if ctx.watcher is not None:
        ctx.watcher.jitter = ctx.jitter


def watch_from_env() -> None:
    """``EMU_WATCH=1`` / ``strict``, or ``EMU_JITTER_MS`` (delays need the wrappers): watch."""
    mode = os.environ.get("EMU_WATCH", "").lower()
    if mode in ("strict", "1", "true", "on", "record") or Jitter.from_env() is not None:
        watch(strict=mode == "strict")


def watched_group(req: Request) -> tuple[str, list[int]] | None:
    """(name, global ranks) of the group an op is watched on: its EP group, or under active
    elastic scaling the survivors alone; None when the group is unknown."""
    pg = resolve_group(req.place.group_ep)
    if pg is None:
        return None
    ranks = dist.get_process_group_ranks(pg)
    remap = usable_remap(req.inputs.elastic_info, len(ranks), dist.get_rank(pg))
    if remap is not None and remap.active:
        ranks = [ranks[int(r)] for r in remap.survivors()]
        return f"{group_name(pg)}/survivors {','.join(map(str, sorted(ranks)))}", ranks
    return group_name(pg), ranks
