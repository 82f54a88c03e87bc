"""The chips mc2-emu emulates, and how one op call runs on them.

The SoC setting (``EMU_SOC``, :mod:`emu.core.soc`) picks a :class:`Chip`; its checks turn the
request into a validated call and pick the path (A2: "fullmesh" or "hierarchy").  A call
reads linearly: check -> open the call -> the path's phases -> performance_info.  A new SoC
is a package plus one entry in ``CHIPS``; a new algorithm a module plus one entry in its
chip's ``paths``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .a2 import checks as a2_checks
from .a2 import fullmesh, hierarchy
from .a3 import checks as a3_checks
from .a3 import combine as a3_combine
from .a3 import dispatch as a3_dispatch
from .a3 import steady as a3_steady
from .comm.call import Call, open_call
from .comm.context import CommContext, current
from .comm.watching import watched_group
from .core.errors import AclnnError, ErrorKind
from .core.inputs import CombineInputs, DispatchInputs
from .core.layout import DispatchOutputs
from .core.request import CombineRequest, DispatchRequest, Prepared, R, Request, attempt
from .core.soc import current_soc
from .debug.watch import Fingerprint, Watcher, call_site


@dataclass(frozen=True)
class Path:
    """One algorithm of a chip: its dispatch and combine on an open call."""

    dispatch: Callable[[Call, Prepared, DispatchInputs], DispatchOutputs]
    combine: Callable[[Call, Prepared, CombineInputs], torch.Tensor | tuple[torch.Tensor, ...]]


def _as_given(req: R) -> R:
    return req


@dataclass(frozen=True)
class Steady:
    """A chip's steady state (:mod:`emu.a3.steady`): ``learn`` keeps what a successful general
    call validated; ``dispatch`` / ``combine`` run a later call of the same signature on it,
    returning (result, call), or None for the general path."""

    learn: Callable[[Request, Prepared, Call], None]
    dispatch: Callable[[DispatchRequest, CommContext], tuple[DispatchOutputs, Call] | None]
    combine: Callable[[CombineRequest, CommContext], tuple[torch.Tensor, Call] | None]


@dataclass(frozen=True)
class Chip:
    """A chip's checks (request -> validated call, whose ``algorithm`` names the path), its
    paths, whether it supports elastic scaling (the survivors' own EP domain), and how it
    reads a request (A2 forces tp and shared experts to 0)."""

    check_dispatch: Callable[[DispatchRequest], Prepared]
    check_combine: Callable[[CombineRequest], Prepared]
    paths: Mapping[str, Path]
    elastic: bool = True
    adapt: Callable[[R], R] = _as_given
    steady: Steady | None = None


CHIPS: dict[str, Chip] = {
    "A3": Chip(a3_checks.check_dispatch, a3_checks.check_combine, {"": Path(a3_dispatch.dispatch, a3_combine.combine)},
               steady=Steady(a3_steady.learn, a3_steady.dispatch, a3_steady.combine)),
    "A2": Chip(a2_checks.check_dispatch, a2_checks.check_combine,
               {"fullmesh": Path(fullmesh.dispatch, fullmesh.combine),
                "hierarchy": Path(hierarchy.dispatch, hierarchy.combine)}, elastic=False, adapt=a2_checks.on_a2),
}


def chip(soc: str | None = None) -> Chip:
    """The chip named ``soc``, by default the one ``EMU_SOC`` selects."""
    return CHIPS[soc or current_soc()]


def run(req: Request, on: Chip | None = None) -> DispatchOutputs | torch.Tensor:
    """One op call on this rank: the chip reads the request, checks it, opens the call (every
    rank learns of any error), runs its path's phases, and adds the waits to performance_info.
    A call like one that succeeded before takes the chip's steady path when it has one (the
    same phases, the checks that depend on the signature skipped; :mod:`emu.a3.steady`).
    An error leaves a farewell in the flight recorder first (what this rank raised, blaming
    whom), so that peers never take this rank for dead."""
    on = on or chip()
    req = on.adapt(req)
    ctx = current()
    recorder = ctx.recorder
    recorder.begin_op()
    watched = _watch(ctx.watcher, req) if ctx.watcher is not None else None
    try:
        steady = getattr(on.steady, req.kind)(req, ctx) if on.steady is not None and ctx.steady else None
        if steady is not None:
            result, call = steady
        else:
            checked = attempt(getattr(on, f"check_{req.kind}"), req)
            call = open_call(req, checked, on.elastic)
            result = getattr(on.paths[checked.prep.algorithm], req.kind)(call, checked.prep, req.inputs)
            if on.steady is not None:
                on.steady.learn(req, checked.prep, call)
    except Exception as exc:
        if isinstance(exc, AclnnError) and exc.kind == ErrorKind.BAD_INPUT and not exc.culprits:
            exc.culprits = (dist.get_rank(),)           # it blames its own input
        recorder.farewell(type(exc).__name__, getattr(exc, "kind", None), getattr(exc, "culprits", ()), str(exc),
                          getattr(exc, "code", None))
        ctx.op_raised()
        if watched is not None:
            ctx.watcher.after(watched, failed=True)
        raise
    if watched is not None:
        ctx.watcher.after(watched)
    ctx.op_returned()
    call.add_waits(req.inputs.performance_info)
    return result


def _watch(watcher: Watcher, req: Request) -> dict | None:
    """The op as one collective of its EP group in the watch (None: the group is unknown)."""
    where = watched_group(req)
    if where is None:
        return None
    return watcher.before(*where, Fingerprint.of(req.kind, req.activation, call_site()))


def run_dispatch(req: DispatchRequest, on: Chip | None = None) -> DispatchOutputs:
    return run(req, on)


def run_combine(req: CombineRequest, on: Chip | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """x_out, or combine_add_rms_norm's (y, rstd, x) when ``req.inputs.norm`` is given."""
    return run(req, on)
