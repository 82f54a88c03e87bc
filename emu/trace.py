"""Per-rank communication trace and its merged Chrome-trace view.

Turned on by ``EMU_TRACE=DIR`` (or :func:`enable`).  Every collective the emulator issues
appends one JSON line to ``DIR/rank<global rank>.jsonl``::

    {"rank", "pid", "op", "call", "phase", "group", "group_ranks", "seq", "kind",
     "send_rows", "recv_rows"  (per peer, indexed like group_ranks), "row_bytes",
     "bytes_out", "bytes_in", "dtype", "t0", "t1" (ns, CLOCK_MONOTONIC), "anchor"
     (CLOCK_REALTIME - CLOCK_MONOTONIC of this process, ns), "wait_us" (per source, header
     exchanges only), "error"}

:func:`merge` writes ``DIR/trace.json`` (Chrome trace format, opens in ui.perfetto.dev):
one track per rank, one slice per collective, flow arrows from each send to its receive.
Clocks: on one machine CLOCK_MONOTONIC is shared by all processes; across machines the
merge aligns ranks through their realtime anchors (as good as the hosts' clock sync).
When tracing is off the only cost is one attribute test per collective.
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import IO

_ENV = "EMU_TRACE"


class Tracer:
    """Appends one JSON object per collective to this rank's JSONL file."""

    def __init__(self, directory: str, rank: int):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, f"rank{rank}.jsonl")
        self.anchor = time.time_ns() - time.monotonic_ns()
        self._file: IO[str] = open(self.path, "a", buffering=1)

    def record(self, event: dict) -> None:
        event["anchor"] = self.anchor
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


_tracer: Tracer | None = None
_checked = False


def enable(directory: str) -> None:
    """Start tracing this process into ``directory`` (same as EMU_TRACE=directory)."""
    global _tracer, _checked
    import torch.distributed as dist
    if _tracer is not None:
        _tracer.close()
    _tracer = Tracer(directory, dist.get_rank())
    _checked = True


def disable() -> None:
    global _tracer, _checked
    if _tracer is not None:
        _tracer.close()
    _tracer, _checked = None, True


def active() -> Tracer | None:
    """The tracer when tracing is on (EMU_TRACE read once), else None."""
    global _checked
    if not _checked:
        _checked = True
        if os.environ.get(_ENV):
            enable(os.environ[_ENV])
    return _tracer


def load(directory: str) -> list[dict]:
    """Every event of every rank in ``directory``, ordered by (rank, t0)."""
    events = []
    for path in sorted(glob.glob(os.path.join(directory, "rank*.jsonl"))):
        with open(path) as f:
            events += [json.loads(line) for line in f if line.strip()]
    events.sort(key=lambda e: (e["rank"], e["t0"]))
    return events


def aligned_us(event: dict, key: str, base_ns: int) -> float:
    """Event time ``key`` in microseconds since ``base_ns`` on the common (realtime) clock."""
    return (event[key] + event["anchor"] - base_ns) / 1000.0


def merge(directory: str) -> str:
    """Write ``directory/trace.json`` from the per-rank files; returns its path."""
    events = load(directory)
    out: list[dict] = []
    if events:
        base = min(e["t0"] + e["anchor"] for e in events)
        tids = {g: i + 1 for i, g in enumerate(sorted({e["group"] for e in events}))}
        for r in sorted({e["rank"] for e in events}):
            out.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"rank {r}"}})
            out.append({"ph": "M", "name": "process_sort_index", "pid": r, "args": {"sort_index": r}})
            for g, t in tids.items():
                out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": t, "args": {"name": g}})
        index = {}
        for e in events:
            ts, te = aligned_us(e, "t0", base), aligned_us(e, "t1", base)
            name = f"{e['op']} #{e['call']} {e['phase']}"
            out.append({"ph": "X", "name": name, "cat": e["kind"], "pid": e["rank"], "tid": tids[e["group"]],
                        "ts": ts, "dur": max(te - ts, 0.001),
                        "args": {k: e[k] for k in ("group", "group_ranks", "seq", "send_rows", "recv_rows",
                                                   "bytes_out", "bytes_in", "dtype", "wait_us", "error")
                                 if k in e}})
            index[(e["group"], e["seq"], e["rank"])] = (e, ts, te)
        flow = 0
        for (group, seq, src), (e, ts, _te) in index.items():
            for peer, rows in zip(e["group_ranks"], e["send_rows"]):
                dst = index.get((group, seq, peer))
                if rows == 0 or peer == src or dst is None:
                    continue
                flow += 1
                _de, dts, dte = dst
                out.append({"ph": "s", "id": flow, "name": "rows", "cat": "flow", "pid": src, "tid": tids[group],
                            "ts": ts + 0.0005})
                out.append({"ph": "f", "bp": "e", "id": flow, "name": "rows", "cat": "flow", "pid": peer,
                            "tid": tids[group], "ts": max(dte - 0.0005, dts)})
    path = os.path.join(directory, "trace.json")
    with open(path, "w") as f:
        json.dump({"traceEvents": out, "displayTimeUnit": "ms"}, f)
    return path


if __name__ == "__main__":
    import sys
    print(merge(sys.argv[1]))
