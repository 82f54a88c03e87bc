"""Trace records: one :class:`TraceEvent` per collective per rank, versioned, and the matcher
that pairs every send with its receive across ranks.

On disk: ``DIR/rank<global rank>.jsonl``, one JSON object per line (``TraceEvent.to_json``).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, fields

SCHEMA_VERSION = 2                 # 2: jitter_ms


@dataclass
class TraceEvent:
    """One collective as one rank saw it.

    op / call / phase: which op call (``dispatch`` #3) and which of its exchanges
    (``EP header``, ``EP rows``, ``TP all-gather`` ...); group / group_ranks: the group's name
    and its global ranks in group order; seq: the collective's number in that group;
    send_rows / recv_rows: rows to / from each member (indexed like group_ranks); row_bytes;
    bytes_out / bytes_in; dtype: of the wire buffer; t0 / t1: CLOCK_MONOTONIC ns; anchor:
    CLOCK_REALTIME - CLOCK_MONOTONIC of the process (ns), to align machines; wait_us: per
    member, how long this rank waited for it (header exchanges only); error: the failure, if any;
    jitter_ms: the delay EMU_JITTER_MS put before it.
    """

    rank: int
    pid: int
    op: str
    call: int
    phase: str
    group: str
    group_ranks: list[int]
    seq: int
    kind: str
    send_rows: list[int]
    recv_rows: list[int]
    row_bytes: int
    bytes_out: int
    bytes_in: int
    dtype: str
    t0: int
    t1: int
    anchor: int = 0
    wait_us: list[int] | None = None
    error: str | None = None
    jitter_ms: float | None = None
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "TraceEvent":
        """From a decoded JSON object; fields a newer schema added are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def label(self) -> str:
        return f"{self.op} #{self.call} {self.phase}"


def load(directory: str) -> list[TraceEvent]:
    """Every event of every rank in ``directory``, ordered by (rank, t0)."""
    events = []
    for path in sorted(glob.glob(os.path.join(directory, "rank*.jsonl"))):
        with open(path) as f:
            events += [TraceEvent.from_dict(json.loads(line)) for line in f if line.strip()]
    events.sort(key=lambda e: (e.rank, e.t0))
    return events


@dataclass(frozen=True)
class Transfer:
    """Rows one rank sent another in one collective: the two sides' records."""

    sender: TraceEvent
    receiver: TraceEvent
    rows: int

    @property
    def bytes(self) -> int:
        return self.rows * self.sender.row_bytes


@dataclass(frozen=True)
class Mismatch:
    """A send without the matching receive: the receiver is missing from the collective, is in
    another one, or expects a different size."""

    sender: TraceEvent
    peer: int
    problem: str


def match_transfers(events: list[TraceEvent]) -> tuple[list[Transfer], list[Mismatch]]:
    """Pair every send (rows > 0 to another rank, or any send with zero rows) with the peer's
    record of the same (group, seq); returns the transfers and what does not match."""
    by_key = {(e.group, e.seq, e.rank): e for e in events}
    pairs, bad = [], []
    for (group, seq, src), e in by_key.items():
        for peer, rows in zip(e.group_ranks, e.send_rows):
            other = by_key.get((group, seq, peer))
            if other is None:
                bad.append(Mismatch(e, peer, f"rank {peer} has no record of {group} seq {seq}"))
            elif (other.op, other.call, other.phase) != (e.op, e.call, e.phase):
                bad.append(Mismatch(e, peer, f"rank {peer} was in {other.label()}, not {e.label()}"))
            elif other.recv_rows[other.group_ranks.index(src)] * other.row_bytes != rows * e.row_bytes:
                bad.append(Mismatch(e, peer, f"rank {peer} expects "
                                    f"{other.recv_rows[other.group_ranks.index(src)] * other.row_bytes} bytes, "
                                    f"rank {src} sends {rows * e.row_bytes}"))
            else:
                pairs.append(Transfer(e, other, rows))
    return pairs, bad
