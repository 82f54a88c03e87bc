"""Communication of one operator call: header exchanges and row all-to-alls, with timeouts.

Every group a call uses starts with one *header* exchange (an ``all_to_all_single`` of a
fixed ``(W, HEADER_LEN)`` int64 block), then moves its rows with one uneven
``all_to_all_single`` of packed uint8 rows.  The header carries, from each source to each
destination: the call number and op, an error code, the row count and row size the
destination must expect (gloo corrupts data silently if the two sides disagree), the
source's clock when it entered, and the attributes every rank must agree on.  So a bad
input or a mismatched call on one rank makes every rank raise after one exchange, and the
world stays usable.

Each collective waits at most ``EMU_TIMEOUT_S`` seconds (default 60), then raises naming
the rank, the group and the collective.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import flight, trace
from .errors import TILING_ERROR, AclnnError, PeerError
from .groups import group_label, group_ranks, survivor_group
from .wire import Segments, scratch

MAGIC = 0x4D43325F454D55          # "MC2_EMU"
OPS = {1: "dispatch", 2: "combine"}
OP_CODE = {v: k for k, v in OPS.items()}
# header columns
H_MAGIC, H_OP, H_CALL, H_ERR, H_ROWS, H_ROW_BYTES, H_CLOCK, H_EXPECT, H_ORIGIN, H_NATTR = range(10)
H_ATTRS = 10
HEADER_LEN = 40
MAX_ATTRS = HEADER_LEN - H_ATTRS

_call_counters: dict[str, int] = {}


def timeout_s() -> float:
    """Per-collective timeout in seconds (env ``EMU_TIMEOUT_S``, default 60)."""
    try:
        return float(os.environ.get("EMU_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out; names the rank, group and collective."""


@dataclass
class Domain:
    """One communication domain of a call (EP or TP), seen in *logical* ids.

    Logical id i is the EP (or TP) rank the operator computes with: the group rank, or under
    elastic scaling the new local id.  ``order[i]`` is the group rank of logical id i (None:
    the identity), ``ranks[i]`` its global rank, ``ep_index[i]`` its original EP rank.
    """

    kind: str                     # "EP" or "TP"
    pg: ProcessGroup
    rank: int
    size: int
    ranks: list[int] = field(default_factory=list)
    order: np.ndarray | None = None
    ep_index: np.ndarray | None = None
    name: str = ""
    bare: bool = False            # a backend object not registered with torch.distributed

    @classmethod
    def of(cls, kind: str, pg: ProcessGroup) -> "Domain":
        size = dist.get_world_size(pg)
        return cls(kind=kind, pg=pg, rank=dist.get_rank(pg), size=size, ranks=group_ranks(pg),
                   ep_index=np.arange(size), name=group_label(pg))

    @classmethod
    def subset(cls, kind: str, full: "Domain", members: list[int]) -> "Domain":
        """A domain of the EP ranks ``members`` (ascending), made by them alone (bare gloo)."""
        globals_ = [full.ranks[m] for m in members]
        pg, name = survivor_group(globals_, timeout_s(), prefix=kind.lower())
        return cls(kind=kind, pg=pg, rank=members.index(full.rank), size=len(members), ranks=globals_,
                   ep_index=np.asarray(members, dtype=np.int64), name=name, bare=True)

    @classmethod
    def survivors(cls, full: "Domain", old_ep_ranks: np.ndarray, my_new_id: int) -> "Domain":
        """The EP domain of an elastic call: new id i = original EP rank ``old_ep_ranks[i]``."""
        globals_ = [full.ranks[int(r)] for r in old_ep_ranks]
        pg, name = survivor_group(globals_, timeout_s())
        members = sorted(globals_)
        order = np.array([members.index(g) for g in globals_], dtype=np.int64)
        return cls(kind="EP", pg=pg, rank=my_new_id, size=len(globals_), ranks=globals_,
                   order=None if bool((order == np.arange(order.size)).all()) else order,
                   ep_index=np.asarray(old_ep_ranks, dtype=np.int64), name=name, bare=True)

    def describe(self) -> str:
        return f"{self.kind} group {self.name} (ranks {self.ranks})"

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                   in_splits: list[int] | None):
        """Start an all_to_all_single on this domain; returns the Work."""
        if self.bare:
            return self.pg.alltoall_base(out, inp, out_splits or [], in_splits or [], dist.AllToAllOptions())
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.pg, async_op=True)

    def to_group(self, per_logical: np.ndarray) -> np.ndarray:
        """Reorder an array indexed by logical id into group-rank order."""
        if self.order is None:
            return per_logical
        out = np.empty_like(per_logical)
        out[self.order] = per_logical
        return out

    def from_group(self, per_group: np.ndarray) -> np.ndarray:
        """Reorder an array indexed by group rank into logical-id order."""
        return per_group if self.order is None else per_group[self.order]


_group_seq: dict[str, int] = {}
collectives_issued = 0          # every collective of this process (benchmarks count them)


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 4, 5] -> "0-2, 4-5"."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _who(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_spans(ranks)}"


def _issue(call: "Call", dom: Domain, phase: str, out: torch.Tensor, inp: torch.Tensor,
           send_rows: np.ndarray, recv_rows: np.ndarray, row_bytes: int, equal: bool = False,
           extra: Callable[[int, int], dict] | None = None) -> tuple[int, int]:
    """Issue one all_to_all_single on ``dom`` and wait for it (at most EMU_TIMEOUT_S).

    ``send_rows`` / ``recv_rows``: rows per peer in logical order (for the trace); ``inp`` /
    ``out`` are already in group-rank order.  Every collective goes through here: per-group
    sequence number, flight recorder, optional fault injection, trace record, and on failure
    an error naming this rank, the collective and the peers that never finished it.
    Returns (t0, t1) in CLOCK_MONOTONIC ns.
    """
    global collectives_issued
    collectives_issued += 1
    seq = _group_seq.get(dom.name, 0) + 1
    _group_seq[dom.name] = seq
    flight.maybe_fail(call.op, phase)
    if equal:                  # header exchanges only: the rows exchange follows at seq + 1
        flight.entered(dom.name, seq, call.op, call.call_no, phase)
    splits_out = None if equal else [int(c) for c in dom.to_group(recv_rows)]
    splits_in = None if equal else [int(c) for c in dom.to_group(send_rows)]
    limit = timeout_s()
    t0 = time.monotonic_ns()
    error = None
    try:
        work = dom.all_to_all(out, inp, splits_out, splits_in)
        work.wait(timeout=timedelta(seconds=limit))
    except RuntimeError as exc:
        what = f"{call.op} #{call.call_no} {phase}"
        error = CollectiveError(
            f"rank {dist.get_rank()}: all_to_all_single '{what}' (seq {seq}) on {dom.describe()} failed or did "
            f"not complete within {limit:g} s (EMU_TIMEOUT_S). "
            f"{flight.diagnose(dom.name, dom.ranks, seq, repr(what))}. Cause: {str(exc).splitlines()[0][:300]}")
    t1 = time.monotonic_ns()
    more = extra(t0, t1) if extra is not None and error is None else {}
    tracer = trace.active()
    if tracer is not None:
        tracer.record({"rank": dist.get_rank(), "pid": os.getpid(), "op": call.op, "call": call.call_no,
                       "phase": phase, "group": dom.name, "group_ranks": list(map(int, dom.ranks)), "seq": seq,
                       "kind": "all_to_all_single", "send_rows": send_rows.tolist(), "recv_rows": recv_rows.tolist(),
                       "row_bytes": row_bytes, "bytes_out": int(send_rows.sum()) * row_bytes,
                       "bytes_in": int(recv_rows.sum()) * row_bytes, "dtype": str(inp.dtype).replace("torch.", ""),
                       "t0": t0, "t1": t1, "error": str(error) if error else None, **more})
    if error is not None:
        raise error
    return t0, t1


@dataclass
class Call:
    """State of one dispatch or combine call on this rank."""

    op: str
    ep: Domain
    tp: Domain | None
    attrs: list[tuple[str, int]]
    call_no: int = 0
    clock_ns: int = 0
    pending: list[str] = field(default_factory=list)     # domains whose header is still due
    extra: dict = field(default_factory=dict)            # further domains by kind
    wait_us: np.ndarray | None = None                     # (W,) per-source wait of the EP header

    @classmethod
    def start(cls, op: str, ep: Domain, tp: Domain | None, attrs: list[tuple[str, int]],
              order: list[str]) -> "Call":
        key = ep.name
        no = _call_counters.get(key, 0) + 1
        _call_counters[key] = no
        return cls(op=op, ep=ep, tp=tp, attrs=attrs[:MAX_ATTRS], call_no=no,
                   clock_ns=time.monotonic_ns(), pending=list(order))

    def domain(self, kind: str) -> Domain:
        if kind == "EP":
            return self.ep
        if kind == "TP":
            return self.tp
        return self.extra[kind]

    def add_domain(self, dom: Domain) -> None:
        """A further domain of this call (A2 hierarchy: "INTER" / "INTRA" server groups)."""
        self.extra[dom.kind] = dom

    def _header(self, dom: Domain, error: int, rows: np.ndarray, row_bytes: int,
                expect: np.ndarray, origin: int) -> torch.Tensor:
        h = torch.zeros(dom.size, HEADER_LEN, dtype=torch.int64)
        h[:, H_MAGIC] = MAGIC
        h[:, H_OP] = OP_CODE[self.op]
        h[:, H_CALL] = self.call_no
        h[:, H_ERR] = error
        h[:, H_ROWS] = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        h[:, H_ROW_BYTES] = row_bytes
        h[:, H_CLOCK] = self.clock_ns
        h[:, H_EXPECT] = torch.from_numpy(np.asarray(expect, dtype=np.int64))
        h[:, H_ORIGIN] = origin
        h[:, H_NATTR] = len(self.attrs)
        if self.attrs:
            h[:, H_ATTRS:H_ATTRS + len(self.attrs)] = torch.tensor([v for _, v in self.attrs])
        return h

    def exchange_header(self, kind: str, rows: np.ndarray, row_bytes: int,
                        expect: np.ndarray, error: int = 0, origin: int = -1) -> np.ndarray:
        """Header all-to-all on domain ``kind``; returns (size, HEADER_LEN) from each source.

        Raises PeerError on every rank when a peer reported an error or disagrees on the op,
        the call number or an attribute (after first telling the remaining domains).
        """
        dom = self.domain(kind)
        if kind in self.pending:
            self.pending.remove(kind)
        send = self._header(dom, error, rows, row_bytes, expect, origin)
        if dom.order is not None:
            send = send[torch.from_numpy(np.argsort(dom.order))]
        recv = torch.empty_like(send)
        ones = np.ones(dom.size, dtype=np.int64)

        def waits(t0: int, t1: int) -> dict:
            # microseconds this rank waited for each source: from entering the exchange to that
            # source's own entry clock (carried in its header), within [0, duration]
            clocks = dom.from_group(recv.numpy())[:, H_CLOCK]
            w = (np.clip(clocks - t0, 0, t1 - t0) // 1000).astype(np.int64)
            if kind == "EP":
                self.wait_us = w
            return {"wait_us": w.tolist()}
        _issue(self, dom, f"{kind} header", recv, send, ones, ones, HEADER_LEN * 8, equal=True, extra=waits)
        hdr = dom.from_group(recv.numpy())
        if error == 0:
            problem = self._check_peers(dom, hdr)
            if problem is not None:
                self.abort(problem)
        return hdr

    def exchange_segments(self, kind: str, send: torch.Tensor, sent: Segments, received: Segments,
                          phase: str) -> torch.Tensor:
        """All-to-all of a segment buffer (``wire.Segments``, peers in group-rank order).

        send: (sent.total, width) uint8.  Returns (received.total, width) uint8.
        """
        dom = self.domain(kind)
        out = scratch("recv", received.total, sent.width)
        _issue(self, dom, f"{kind} {phase}", out, send, dom.from_group(sent.rows), dom.from_group(received.rows),
               sent.width)
        return out

    def exchange_rows(self, kind: str, send: torch.Tensor, send_counts: np.ndarray, recv_counts: np.ndarray,
                      phase: str) -> torch.Tensor:
        """Uneven all-to-all of packed rows on domain ``kind``.

        send: (n, B) uint8, blocks in logical destination order; send_counts / recv_counts: rows
        per logical peer.  Returns (sum(recv_counts), B) uint8, blocks in group-rank order.
        """
        dom = self.domain(kind)
        width = send.shape[1]
        if dom.order is not None and send.shape[0]:         # move blocks into group-rank order
            starts = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
            idx = np.concatenate([np.arange(starts[i], starts[i] + send_counts[i]) for i in np.argsort(dom.order)])
            send = send[torch.from_numpy(idx.astype(np.int64))]
        out = torch.empty(int(recv_counts.sum()), width, dtype=torch.uint8)
        _issue(self, dom, f"{kind} {phase}", out, send.contiguous(), np.asarray(send_counts, np.int64),
               np.asarray(recv_counts, np.int64), width)
        return out

    def _check_peers(self, dom: Domain, hdr: np.ndarray) -> AclnnError | None:
        """The same verdict on every rank: a peer's error, a call mismatch or an attribute
        mismatch (each rank sees every peer's header), else None."""
        ranks = dom.ranks
        me = dist.get_rank()
        bad = np.flatnonzero(hdr[:, H_MAGIC] != MAGIC)
        if bad.size:
            return PeerError(TILING_ERROR, f"rank {me}: {_who([ranks[i] for i in bad])} sent data that is not "
                             f"an mc2-emu header on {dom.describe()} (a collective outside the op?)")
        err = np.flatnonzero(hdr[:, H_ERR] != 0)
        if err.size:
            origins = sorted({int(hdr[i, H_ORIGIN]) for i in err})
            via = sorted({ranks[i] for i in err} - set(origins))
            details = []
            for o in origins:
                text = flight.store_message(f"emu_err/{o}/{int(hdr[err[0], H_CALL])}")
                details.append(f"rank {o}: {text}" if text else f"rank {o}: error {int(hdr[err[0], H_ERR])}")
            return PeerError(int(hdr[err[0], H_ERR]),
                             f"rank {me}: {self.op} call #{self.call_no} aborted because {_who(origins)} "
                             f"rejected its input" + (f" (reported through {_who(via)})" if via else "")
                             + f" on {dom.describe()}: " + " | ".join(details), origins=origins)
        calls: dict[tuple[str, int], list[int]] = {}
        for i in range(dom.size):
            calls.setdefault((OPS.get(int(hdr[i, H_OP]), "?"), int(hdr[i, H_CALL])), []).append(ranks[i])
        if len(calls) > 1:
            groups = sorted(calls.items(), key=lambda kv: len(kv[1]))
            desc = " while ".join(f"{_who(sorted(rs))} called {op} #{no}" for (op, no), rs in groups)
            return PeerError(TILING_ERROR, f"rank {me}: mismatched calls on {dom.describe()}: {desc}")
        for idx, (name, value) in enumerate(self.attrs):
            col = hdr[:, H_ATTRS + idx]
            if (col != value).any():
                by_value: dict[int, list[int]] = {}
                for i in range(dom.size):
                    by_value.setdefault(int(col[i]), []).append(ranks[i])
                desc = " while ".join(f"{_who(sorted(rs))} passed {v}"
                                      for v, rs in sorted(by_value.items(), key=lambda kv: len(kv[1])))
                return PeerError(TILING_ERROR, f"rank {me}: attribute {name} differs between the ranks of "
                                 f"{self.op} call #{self.call_no} on {dom.describe()}: {desc}")
        return None

    def abort(self, err: AclnnError) -> None:
        """Tell every domain whose header is still due that this call failed, then raise."""
        code = err.code if isinstance(err, AclnnError) else TILING_ERROR
        origins = getattr(err, "origins", None) or [dist.get_rank()]
        if not isinstance(err, PeerError):          # peers quote this rank's own message
            flight.store_message(f"emu_err/{dist.get_rank()}/{self.call_no}", str(err)[:2000])
        for kind in list(self.pending):
            dom = self.domain(kind)
            if dom is None:
                self.pending.remove(kind)
                continue
            zeros = np.zeros(dom.size, dtype=np.int64)
            self.exchange_header(kind, zeros, 0, zeros, error=code, origin=origins[0])
        raise err
