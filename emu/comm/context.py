"""Per-process state of the communication layer, held in one object.

Call numbers and collective sequence numbers per group, the reusable wire buffers, the
group-name registry, the bare groups the emulator built itself, the trace sink and the
flight recorder all live in a :class:`CommContext`.  Each process has one (``current()``);
a second transport, or several ranks in one process, would each get their own.
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..core.env import getenv
from ..debug.events import TraceEvent
from ..debug.flight import FlightRecorder
from ..debug.trace import Tracer
from ..debug.watch import Jitter, Watcher

TRACE_ENV = "EMU_TRACE"
TRANSPORTS = ("auto", "split", "bare")


def transport_mode() -> str:
    """``EMU_TRANSPORT``: "auto" (default: a call's rows travel with its header when they fit the
    slot the group's previous call of that op sized, or bare, straight between the op's
    tensors after it, when they are large and the op can send them so), "bare" (bare whenever
    the op can, whatever their size) or "split" (always a header exchange, then a rows
    exchange of packed rows).  Every rank of a job must use the same mode."""
    raw = getenv("EMU_TRANSPORT", "auto")
    if raw == "auto":                       # the common case, read on every exchange
        return raw
    mode = raw.strip().lower() or "auto"
    if mode not in TRANSPORTS:
        raise ValueError(f"EMU_TRANSPORT={mode!r} must be one of {TRANSPORTS}")
    return mode


@dataclass(frozen=True)
class OwnGroup:
    """One of the emulator's own gloo groups: the object, its store prefix (``name``), the name
    it is known by whatever its generation (``base``), and its generation (how many times one of
    its members abandoned a collective on it; a new generation is a new gloo group)."""

    pg: object
    name: str
    base: str
    gen: int


@dataclass
class CommContext:
    """Mutable state of one process's emulator communication."""

    call_counters: dict[tuple[str, str], int] = field(default_factory=dict)  # (EP group, op or "") -> last
    group_seq: dict[str, int] = field(default_factory=dict)         # group name -> last collective seq
    collectives_issued: int = 0                                     # every collective (benchmarks count them)
    wire_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    group_names: dict[str, str] = field(default_factory=dict)       # emu group name -> torch's group name
    bare_groups: dict[tuple, "OwnGroup"] = field(default_factory=dict)   # (prefix, members) -> group
    graveyard: list = field(default_factory=list)                   # abandoned groups, kept until exit
    suspect: bool = False                                           # the last op call raised
    validated: set = field(default_factory=set)                     # groups checked since it raised
    recorder: FlightRecorder = field(default_factory=FlightRecorder)
    tracer: Tracer | None = None
    trace_checked: bool = False                                     # EMU_TRACE read once
    watcher: Watcher | None = None                                  # emu.watch() / EMU_WATCH
    jitter: Jitter | None = field(default_factory=Jitter.from_env)  # EMU_JITTER_MS
    slots: dict[str, dict[str, tuple[int, bool]]] = field(default_factory=dict)  # group -> op -> (bytes, bare)
    slot_most: dict[str, int] = field(default_factory=dict)       # group -> the most bytes of its ops' slots
    steady: dict = field(default_factory=dict)                      # what steady calls reuse (emu.a3.steady)
    steady_calls: int = 0                                           # op calls that took the steady path (opened there)
    bare_exchanges: int = 0                                         # exchanges whose rows went bare
    views: dict = field(default_factory=dict)                       # views of wire buffers, by shape

    def slot(self, group: str) -> int:
        """Bytes per peer of a call's first exchange on ``group``: 0 (just the header) until a
        call there passed its header exchange, then the most any op's agreed rows need.  Every
        member of a group sees the same calls and verdicts there, so every member has the same
        slot whatever op it calls next (a rank calling another op is then told, not corrupted)."""
        most = self.slot_most.get(group)
        return most if most is not None and transport_mode() != "split" else 0

    def goes_bare(self, group: str, op: str) -> bool:
        """``op``'s previous call on ``group`` planned its next rows bare (``Call.exchange``); the
        same on every member, as :meth:`slot`."""
        need = self.slots.get(group, {}).get(op)
        return need is not None and need[1] and transport_mode() != "split"

    def set_slot(self, group: str, op: str, nbytes: int, bare: bool = False) -> None:
        if transport_mode() == "split":
            return
        needs = self.slots.setdefault(group, {})
        if needs.get(op) != (nbytes, bare):                 # a steady loop plans the same slot again
            needs[op] = (nbytes, bare)
            self.slot_most[group] = max(n for n, _ in needs.values())

    def next_call(self, group: str, op: str) -> tuple[int, int]:
        """(the place of this call among all op calls on ``group``, its number among ``op``'s
        calls there): ranks must agree on the first; messages show the second (``combine #1``
        is the first combine)."""
        for key in ((group, ""), (group, op)):
            self.call_counters[key] = self.call_counters.get(key, 0) + 1
        return self.call_counters[group, ""], self.call_counters[group, op]

    def next_seq(self, group: str) -> int:
        self.collectives_issued += 1
        self.group_seq[group] = self.group_seq.get(group, 0) + 1
        return self.group_seq[group]

    def scratch(self, tag: str, rows: int, width: int) -> torch.Tensor:
        """A reusable (rows, width) uint8 buffer for wire data, one per ``tag``, grown on demand.

        Fresh large tensors cost page faults on every call; wire buffers never leave the op, so
        they are kept between calls (outputs handed to the user are always fresh tensors)."""
        need = rows * width
        buf = self.wire_buffers.get(tag)
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, 1), dtype=torch.uint8)
            self.wire_buffers[tag] = buf
        return buf[:need].view(rows, width)

    def trace_sink(self) -> Tracer | None:
        """The tracer when tracing is on (``EMU_TRACE`` read on first use), else None."""
        if not self.trace_checked:
            self.trace_checked = True
            if os.environ.get(TRACE_ENV):
                self.tracer = Tracer(os.environ[TRACE_ENV], dist.get_rank())
        return self.tracer

    def release_groups(self) -> None:
        """Drop the bare groups (before interpreter teardown: none may outlive it)."""
        self.bare_groups.clear()
        self.graveyard.clear()

    def op_raised(self) -> None:
        """An op call raised: before this process uses a group again, it checks whether a peer
        abandoned it meanwhile (its generation moved on)."""
        self.suspect = True
        self.validated.clear()
        self.steady.clear()

    def op_returned(self) -> None:
        self.suspect = False


_current: CommContext | None = None


def current() -> CommContext:
    """This process's context (made on first use)."""
    global _current
    if _current is None:
        _current = CommContext()
        atexit.register(_current.release_groups)
    if not _current.recorder.registered and dist.is_initialized():
        _current.recorder.register()          # pid and stack file, so peers can tell where it is
    return _current


def enable_trace(directory: str) -> None:
    """Record every collective of this process into ``directory`` (same as EMU_TRACE=directory)."""
    ctx = current()
    if ctx.tracer is not None:
        ctx.tracer.close()
    ctx.tracer, ctx.trace_checked = Tracer(directory, dist.get_rank()), True


def mark(label: str) -> None:
    """Name the phase that starts now in this rank's trace (the report's timeline shows it)."""
    tracer = current().trace_sink() if dist.is_initialized() else None
    if tracer is not None:
        now = time.monotonic_ns()
        tracer.record(TraceEvent(rank=dist.get_rank(), pid=os.getpid(), op="mark", call=0, phase=label, group="",
                                 group_ranks=[], seq=0, kind="mark", send_rows=[], recv_rows=[], row_bytes=0,
                                 bytes_out=0, bytes_in=0, dtype="", t0=now, t1=now))


def disable_trace() -> None:
    """Stop recording this process's collectives: its trace file is closed and EMU_TRACE is not read again."""
    ctx = current()
    if ctx.tracer is not None:
        ctx.tracer.close()
    ctx.tracer, ctx.trace_checked = None, True
