"""Per-process state of the communication layer, held in one object.

Call numbers and collective sequence numbers per group, the reusable wire buffers, the
group-name registry, the bare groups the emulator built itself, the trace sink and the
flight recorder all live in a :class:`CommContext`.  Each process has one (``current()``);
a second transport, or several ranks in one process, would each get their own.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..debug.flight import FlightRecorder
from ..debug.trace import Tracer

TRACE_ENV = "EMU_TRACE"


@dataclass
class CommContext:
    """Mutable state of one process's emulator communication."""

    call_counters: dict[str, int] = field(default_factory=dict)     # EP group name -> last call number
    group_seq: dict[str, int] = field(default_factory=dict)         # group name -> last collective seq
    collectives_issued: int = 0                                     # every collective (benchmarks count them)
    wire_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    group_names: dict[str, str] = field(default_factory=dict)       # emu group name -> torch's group name
    bare_groups: dict[tuple, tuple] = field(default_factory=dict)   # key -> (ProcessGroupGloo, name)
    recorder: FlightRecorder = field(default_factory=FlightRecorder)
    tracer: Tracer | None = None
    trace_checked: bool = False                                     # EMU_TRACE read once

    def next_call(self, group: str) -> int:
        self.call_counters[group] = self.call_counters.get(group, 0) + 1
        return self.call_counters[group]

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


def disable_trace() -> None:
    ctx = current()
    if ctx.tracer is not None:
        ctx.tracer.close()
    ctx.tracer, ctx.trace_checked = None, True
