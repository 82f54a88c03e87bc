"""The per-rank trace sink and the merged Chrome-trace view.

Turned on by ``EMU_TRACE=DIR`` (or ``emu.enable_trace(DIR)``): every collective the emulator
issues appends one :class:`~emu.debug.events.TraceEvent` to ``DIR/rank<global rank>.jsonl``.
:func:`merge` writes ``DIR/trace.json`` (Chrome trace format, opens in ui.perfetto.dev): one
track per rank, one slice per collective, flow arrows from each send to its receive.
Clocks: on one machine CLOCK_MONOTONIC is shared by all processes; across machines the merge
aligns ranks through their realtime anchors (as good as the hosts' clock sync).
When tracing is off the only cost is one attribute test per collective.
"""
from __future__ import annotations

import json
import os
import time
from typing import IO

from .events import TraceEvent, load, match_transfers


class Tracer:
    """Appends one JSON line per collective to this rank's file."""

    def __init__(self, directory: str, rank: int):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, f"rank{rank}.jsonl")
        self.anchor = time.time_ns() - time.monotonic_ns()
        self._file: IO[str] = open(self.path, "a", buffering=1)

    def record(self, event: TraceEvent) -> None:
        event.anchor = self.anchor
        self._file.write(event.to_json() + "\n")

    def close(self) -> None:
        self._file.close()


def aligned_us(event: TraceEvent, t_ns: int, base_ns: int) -> float:
    """Time ``t_ns`` of ``event`` in microseconds since ``base_ns`` on the common (realtime) clock."""
    return (t_ns + event.anchor - base_ns) / 1000.0


_SLICE_ARGS = ("group", "group_ranks", "seq", "send_rows", "recv_rows", "bytes_out", "bytes_in", "dtype",
               "wait_us", "error")


def merge(directory: str) -> str:
    """Write ``directory/trace.json`` from the per-rank files; returns its path."""
    events = load(directory)
    out: list[dict] = []
    if events:
        base = min(e.t0 + e.anchor for e in events)
        marks = [e for e in events if e.kind == "mark"]
        events = [e for e in events if e.kind != "mark"]
        tids = {g: i + 1 for i, g in enumerate(sorted({e.group for e in events}))}
        for r in sorted({e.rank for e in events}):
            out.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"rank {r}"}})
            out.append({"ph": "M", "name": "process_sort_index", "pid": r, "args": {"sort_index": r}})
            for g, t in tids.items():
                out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": t, "args": {"name": g}})
        for e in events:
            ts, te = aligned_us(e, e.t0, base), aligned_us(e, e.t1, base)
            out.append({"ph": "X", "name": e.label(), "cat": e.kind, "pid": e.rank, "tid": tids[e.group],
                        "ts": ts, "dur": max(te - ts, 0.001),
                        "args": {k: getattr(e, k) for k in _SLICE_ARGS if getattr(e, k) is not None}})
        for m in marks:                                           # phases named with emu.mark
            out.append({"ph": "i", "s": "p", "name": m.phase, "pid": m.rank, "tid": 0, "ts": aligned_us(m, m.t0, base)})
        transfers, _ = match_transfers(events)
        flow = 0
        for tr in transfers:
            src, dst = tr.sender, tr.receiver
            if tr.rows == 0 or dst.rank == src.rank:
                continue
            flow += 1
            ts = aligned_us(src, src.t0, base)
            dts, dte = aligned_us(dst, dst.t0, base), aligned_us(dst, dst.t1, base)
            out.append({"ph": "s", "id": flow, "name": "rows", "cat": "flow", "pid": src.rank,
                        "tid": tids[src.group], "ts": ts + 0.0005})
            out.append({"ph": "f", "bp": "e", "id": flow, "name": "rows", "cat": "flow", "pid": dst.rank,
                        "tid": tids[src.group], "ts": max(dte - 0.0005, dts)})
    path = os.path.join(directory, "trace.json")
    with open(path, "w") as f:
        json.dump({"traceEvents": out, "displayTimeUnit": "ms"}, f)
    return path
