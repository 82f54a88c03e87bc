"""Where an op call's own thread goes: the thread CPU of named phases, inclusive, over a loop
of round trips (a diagnostic in the manner of a profiler: while it runs, each named function
is replaced, wherever the emulator's modules hold it, by a wrapper that adds up
``time.thread_time_ns`` around it; the functions are put back on exit).

Thread CPU, not wall time: a phase that waits in a collective counts only what it computes,
and gloo's own threads are not in it.  Each wrapper costs about a microsecond per call.
"""
from __future__ import annotations

import functools
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch.distributed as dist

from ..chips import CHIPS
from .suite import make_point

#: (module, qualified name) of the phases of a steady A3 round trip, outermost first.
PHASES: tuple[tuple[str, str], ...] = (
    ("emu.chips", "run"),
    ("emu.a3.steady", "dispatch"), ("emu.a3.steady", "combine"), ("emu.a3.steady", "_kept"),
    ("emu.a3.steady", "_ids_pass"), ("emu.a3.steady", "_open"),
    ("emu.comm.call", "Call.exchange"), ("emu.comm.call", "Call._first_exchange"), ("emu.comm.transport", "issue"),
    ("emu.comm.domain", "Domain.all_to_all"), ("emu.comm.transport", "_wait"),
    ("emu.debug.flight", "FlightRecorder.entered"), ("emu.comm.verdict", "judge"),
    ("emu.a3.dispatch", "pack_rows"), ("emu.a3.dispatch", "lay_out"), ("emu.core.layout", "DispatchOutputs.allocate"),
    ("emu.a3.dispatch", "tp_all_gather"), ("emu.a3.dispatch", "count_outputs"),
    ("emu.a3.combine", "tp_reduce_scatter"), ("emu.a3.combine", "pack_rows"), ("emu.a3.combine", "_cross_check"),
    ("emu.a3.combine", "_native_out"), ("emu.a3.combine", "_native_sum"),
)


@dataclass
class PhaseCost:
    """Thread CPU (ns) and calls of each phase since the wrappers went in (or :meth:`reset`)."""

    ns: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.ns.clear()
        self.calls.clear()

    def table(self, round_trips: int) -> list[tuple[str, float, float]]:
        """(phase, microseconds per round trip, calls per round trip), costliest first."""
        rows = [(name, ns / round_trips / 1e3, self.calls[name] / round_trips) for name, ns in self.ns.items()]
        return sorted(rows, key=lambda r: -r[1])


def _timed(fn: Callable, name: str, cost: PhaseCost) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            cost.ns[name] = cost.ns.get(name, 0) + time.thread_time_ns() - t0
            cost.calls[name] = cost.calls.get(name, 0) + 1
    return wrapper


def _holders(fn: Callable, owner: object, attr: str) -> list[tuple[object, str, Callable]]:
    """Every other place of the emulator that holds ``fn``: a module's name for it (``from x
    import fn``), or a field of a chip's frozen tables of paths (set past the freeze); each
    with the setter that puts a value there."""
    out: list[tuple[object, str, Callable]] = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "emu" or mod_name.startswith("emu.")):
            continue
        out += [(mod, name, setattr) for name, value in list(vars(mod).items())
                if value is fn and (mod, name) != (owner, attr)]
    for chip in CHIPS.values():
        for table in (chip.steady, *chip.paths.values()):
            out += [(table, name, object.__setattr__) for name in getattr(table, "__dataclass_fields__", {})
                    if getattr(table, name) is fn]
    return out


@contextmanager
def measured(phases: tuple[tuple[str, str], ...] = PHASES) -> Iterator[PhaseCost]:
    """Wrap ``phases`` (those that exist) for the ``with`` block; yields their running cost."""
    cost = PhaseCost()
    undo: list[tuple[object, str, object]] = []
    for mod_name, qual in phases:
        owner: object = importlib.import_module(mod_name)
        *path, attr = qual.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, attr, None)
        if fn is None:
            continue
        wrapped = _timed(fn, f"{mod_name.removeprefix('emu.')}.{qual}", cost)
        for holder, name, put in [(owner, attr, setattr)] + _holders(fn, owner, attr):
            undo.append((put, holder, name, fn))
            put(holder, name, wrapped)
    try:
        yield cost
    finally:
        for put, holder, name, fn in reversed(undo):
            put(holder, name, fn)


def phase_costs(pt: dict, calls: int, warmup: int = 20) -> tuple[list[tuple[str, float, float]], float]:
    """Under torchrun: ``calls`` round trips of the benchmark point ``pt`` (:func:`~emu.bench.suite.make_point`)
    after ``warmup`` untimed ones, with every phase measured on every rank; returns this rank's
    table (:meth:`PhaseCost.table`) and its main thread's CPU per round trip in ms."""
    point = make_point(pt)
    try:
        for _ in range(warmup):
            point.round_trip()
        with measured() as cost:
            dist.barrier()
            cost.reset()
            t0 = time.thread_time_ns()
            for _ in range(calls):
                point.round_trip()
            total = (time.thread_time_ns() - t0) / calls / 1e6
        return cost.table(calls), total
    finally:
        point.close()
