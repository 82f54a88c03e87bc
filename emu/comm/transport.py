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

from ..core.errors import CollectiveError
from ..debug.events import TraceEvent
from ..debug.flight import Failure, maybe_fail
from .context import CommContext
from .domain import Domain, timeout_s


@dataclass(frozen=True)
class Transfer:
    """One all_to_all_single of a call.

    phase: e.g. "EP header", "EP rows"; out / inp: buffers already in group-rank order;
    send_rows / recv_rows: (P,) rows per logical peer (splits and trace); row_bytes: bytes per
    row; equal: equal splits (header exchanges); before: called just before the collective
    starts (after any injected fault: the header's send clock); after: called with (t0, t1) on
    success, returns extra trace fields (the header's waits).
    """

    phase: str
    out: torch.Tensor
    inp: torch.Tensor
    send_rows: np.ndarray
    recv_rows: np.ndarray
    row_bytes: int
    equal: bool = False
    before: Callable[[], None] | None = None
    after: Callable[[int, int], dict] | None = None


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


def issue(ctx: CommContext, tag: CallTag, dom: Domain, xfer: Transfer) -> tuple[int, int]:
    """Issue ``xfer`` on ``dom`` and wait for it (at most EMU_TIMEOUT_S).

    On failure raises CollectiveError naming this rank, the collective and its causes first:
    dead peers (process gone), stuck peers (alive, never arrived) or a peer that failed on its
    own; then one line per state (``FlightRecorder.diagnose``).
    Returns (t0, t1) in CLOCK_MONOTONIC ns.
    """
    seq = ctx.next_seq(dom.name)
    maybe_fail(tag.op, xfer.phase)
    jitter_ms = ctx.jitter.sleep() if ctx.jitter is not None else None
    ctx.recorder.entered(dom.name, seq, tag.op, tag.call_no, xfer.phase)
    splits_out = None if xfer.equal else [int(c) for c in dom.to_group(xfer.recv_rows)]
    splits_in = None if xfer.equal else [int(c) for c in dom.to_group(xfer.send_rows)]
    limit = timeout_s()
    if xfer.before is not None:
        xfer.before()
    t0 = time.monotonic_ns()
    error = None
    try:
        work = dom.all_to_all(xfer.out, xfer.inp, splits_out, splits_in)
        work.wait(timeout=timedelta(seconds=limit))
    except RuntimeError as exc:
        work = None                 # an error's traceback must not keep the group alive (see Domain.backend)
        failure = Failure(group=dom.name, ranks=tuple(dom.ranks), seq=seq, what=f"{tag.op} #{tag.call_no} {xfer.phase}",
                          elapsed_s=(time.monotonic_ns() - t0) / 1e9, limit_s=limit,
                          cause=_cause(exc))
        diag = ctx.recorder.diagnose(failure)
        error = CollectiveError(f"rank {dist.get_rank()}: {diag.text}", diag.kind, diag.culprits, diag.states)
    t1 = time.monotonic_ns()
    more = xfer.after(t0, t1) if xfer.after is not None and error is None else {}
    tracer = ctx.trace_sink()
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
