"""Issuing one collective: sequence number, fault injection, flight record, the all-to-all
itself with a deadline, the trace record, and on failure a typed error naming the peers.

Every collective the emulator makes goes through :func:`issue`.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import CollectiveError, ErrorKind, PeerError
from ..core.ranks import who
from ..debug.events import TraceEvent
from ..debug.flight import Failure, maybe_fail
from .context import CommContext
from .domain import Domain, timeout_s
from .groups import Departed, abandon_group


@dataclass(frozen=True)
class Transfer:
    """One all_to_all_single of a call.

    phase: e.g. "EP header", "EP rows"; out / inp: buffers already in group-rank order;
    send_rows / recv_rows: (P,) rows per logical peer (splits and trace); row_bytes: bytes per
    row; equal: equal splits (header exchanges); before: called just before the collective
    starts (after any injected fault: the header's send clock); after: called with (t0, t1,
    traced) on success, returns extra trace fields when ``traced`` (the header's waits).
    """

    phase: str
    out: torch.Tensor
    inp: torch.Tensor
    send_rows: np.ndarray
    recv_rows: np.ndarray
    row_bytes: int
    equal: bool = False
    before: Callable[[], None] | None = None
    after: Callable[[int, int, bool], dict] | None = None


@dataclass(frozen=True)
class CallTag:
    """Which op call a collective belongs to: ("dispatch", 3)."""

    op: str
    call_no: int


def _cause(exc: BaseException) -> str:
    """gloo's first sentence without its source location: "Connection closed by peer [host]:port"."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return re.split(r"\.\s", text, maxsplit=1)[0][:200]


POLL_S = 0.05          # a collective not done by then looks for members that left the op, then every POLL_S


def _wait(ctx: CommContext, work, dom: Domain, deadline_ns: int) -> dict[int, dict]:
    """Wait for ``work`` until ``deadline_ns``; returns {} when it is done, or the farewells of
    members that raised in this op call without coming (they never will).  Raises the
    collective's own error, or a timeout."""
    while True:
        left = (deadline_ns - time.monotonic_ns()) / 1e9
        try:
            work.wait(timeout=timedelta(seconds=max(min(POLL_S, left), 0.001)))
            return {}
        except RuntimeError:
            if work.is_completed():             # it ended meanwhile: its own outcome, at once
                work.wait()
                return {}
            if left <= POLL_S:
                raise
        ctx.recorder.flush()                    # a peer may soon read where this rank is
        gone = ctx.recorder.departures(dom.ranks)
        if gone:
            return gone


def departure_error(ctx: CommContext, dom: Domain, what: str, gone: dict[int, dict]) -> PeerError | None:
    """The error of a rank whose peers raised an operator error in this call without coming to
    ``what``: the origin's code, blaming whom it blamed (None: no operator error among them)."""
    relayed = sorted((r, bye) for r, bye in gone.items() if bye.get("code") is not None)
    if not relayed:
        return None
    r, bye = relayed[0]
    kind = ErrorKind[bye["kind"]] if bye.get("kind") in ErrorKind.__members__ else ErrorKind.BAD_INPUT
    blamed = tuple(bye.get("culprits") or ()) if kind != ErrorKind.BAD_INPUT else (r,)
    text = (f"rank {dist.get_rank()}: {what} on {dom.describe()} aborted: rank {r} raised in this call "
            f"without coming: {bye['message']}")
    if kind in (ErrorKind.BAD_INPUT, ErrorKind.PEER_BAD_INPUT):
        return PeerError(int(bye["code"]), text, kind=ErrorKind.PEER_BAD_INPUT, origins=list(blamed or (r,)))
    return PeerError(int(bye["code"]), text, kind=kind, culprits=blamed or (r,))


def _diagnosed(ctx: CommContext, failure: Failure) -> CollectiveError:
    diag = ctx.recorder.diagnose(failure)
    return CollectiveError(f"rank {dist.get_rank()}: {diag.text}", diag.kind, diag.culprits, diag.states)


def issue(ctx: CommContext, tag: CallTag, dom: Domain, xfer: Transfer) -> tuple[int, int]:
    """Issue ``xfer`` on ``dom`` and wait for it (at most EMU_TIMEOUT_S).

    On failure raises CollectiveError naming this rank, the collective and its causes first:
    dead peers (process gone), stuck peers (alive, never arrived) or a peer that failed on its
    own; then one line per state (``FlightRecorder.diagnose``).
    Returns (t0, t1) in CLOCK_MONOTONIC ns.
    """
    seq = ctx.next_seq(dom.name)
    maybe_fail(tag.op, xfer.phase, ctx.recorder.flush)
    jitter_ms = ctx.jitter.sleep() if ctx.jitter is not None else None
    ctx.recorder.entered(dom.name, seq, tag.op, tag.call_no, xfer.phase)
    splits_out = None if xfer.equal else [int(c) for c in dom.to_group(xfer.recv_rows)]
    splits_in = None if xfer.equal else [int(c) for c in dom.to_group(xfer.send_rows)]
    limit = timeout_s()
    if xfer.before is not None:
        xfer.before()
    t0 = time.monotonic_ns()
    error: Exception | None = None
    gone: dict[int, dict] = {}
    what = f"{tag.op} #{tag.call_no} {xfer.phase}"
    try:
        work = dom.all_to_all(xfer.out, xfer.inp, splits_out, splits_in)
        gone = _wait(ctx, work, dom, t0 + int(limit * 1e9))
    except Departed as exc:                         # while the group was being set up
        gone = exc.farewells
    except RuntimeError as exc:
        work = None                 # an error's traceback must not keep the group alive (see Domain.backend)
        error = _diagnosed(ctx, Failure(group=dom.name, ranks=tuple(dom.ranks), seq=seq, what=what,
                                        elapsed_s=(time.monotonic_ns() - t0) / 1e9, limit_s=limit, cause=_cause(exc)))
    if gone:
        work = None
        error = departure_error(ctx, dom, what, gone) or _diagnosed(ctx, Failure(
            group=dom.name, ranks=tuple(dom.ranks), seq=seq, what=what, elapsed_s=(time.monotonic_ns() - t0) / 1e9,
            limit_s=limit, cause=f"{who(sorted(gone))} left the op"))
    if error is not None:
        abandon_group(dom.ranks, dom.prefix)        # the collective may still be in flight there
    t1 = time.monotonic_ns()
    tracer = ctx.trace_sink()
    more = xfer.after(t0, t1, tracer is not None) if xfer.after is not None and error is None else {}
    if tracer is not None:
        tracer.record(TraceEvent(
            rank=dist.get_rank(), pid=os.getpid(), op=tag.op, call=tag.call_no, phase=xfer.phase, group=dom.name,
            group_ranks=list(map(int, dom.ranks)), seq=seq, kind="all_to_all_single",
            send_rows=xfer.send_rows.tolist(), recv_rows=xfer.recv_rows.tolist(), row_bytes=xfer.row_bytes,
            bytes_out=int(xfer.send_rows.sum()) * xfer.row_bytes, bytes_in=int(xfer.recv_rows.sum()) * xfer.row_bytes,
            dtype=str(xfer.inp.dtype).replace("torch.", ""), t0=t0, t1=t1, error=str(error) if error else None,
            jitter_ms=jitter_ms, **more))
    if error is not None:
        raise error
    return t0, t1
