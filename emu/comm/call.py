"""The life of one operator call on this rank: open, exchange headers and rows, abort.

Every group a call uses starts with one *header* exchange (:mod:`emu.comm.header`), then
moves its rows with one uneven ``all_to_all_single`` of packed uint8 rows.  So a bad input
or a mismatched call on one rank makes every rank raise after one exchange, and the world
stays usable.  Each collective waits at most ``EMU_TIMEOUT_S`` seconds (default 60), then
raises naming the rank, the group and the collective (:mod:`emu.comm.transport`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..core.checks import Checker, usable_remap
from ..core.errors import TILING_ERROR, AclnnError, PeerError
from ..core.request import Checked, Request
from .context import CommContext, current
from .domain import Domain
from .groups import resolve_group
from .header import HEADER_LEN, MAX_ATTRS, Header, Outgoing, stamp_clock
from .transport import CallTag, Transfer, issue
from .verdict import judge
from .wire import Segments

HEADER_BYTES = 8 * HEADER_LEN


@dataclass
class Call:
    """State of one dispatch or combine call on this rank."""

    op: str                                               # "dispatch" or "combine"
    ep: Domain
    tp: Domain | None
    attrs: tuple[tuple[str, int], ...]
    ctx: CommContext
    call_no: int = 0                                      # this op's calls on the group: "combine #1"
    order: int = 0                                        # all op calls on the group: what ranks must agree on
    clock_ns: int = 0
    pending: list[str] = field(default_factory=list)     # domains whose header is still due
    extra: dict = field(default_factory=dict)            # further domains by kind
    wait_us: np.ndarray | None = None                     # (W,) per-source wait of the EP header

    @property
    def tag(self) -> CallTag:
        return CallTag(self.op, self.call_no)

    def domain(self, kind: str) -> Domain:
        if kind == "EP":
            return self.ep
        if kind == "TP":
            return self.tp
        return self.extra[kind]

    def add_domain(self, dom: Domain) -> None:
        """A further domain of this call (A2 hierarchy: "INTER" / "INTRA" server groups)."""
        self.extra[dom.kind] = dom

    def exchange_header(self, kind: str, rows: np.ndarray, row_bytes: int,
                        expect: np.ndarray, error: int = 0, origin: int = -1) -> Header:
        """Header all-to-all on domain ``kind``: tell every peer ``rows`` (what this rank sends
        it), ``row_bytes`` and ``expect`` (what it expects back); returns every source's header.

        Raises PeerError on every rank when a peer reported an error or disagrees on the op,
        the call number or an attribute (after first telling the remaining domains).
        """
        dom = self.domain(kind)
        if kind in self.pending:
            self.pending.remove(kind)
        out = Outgoing(op=self.op, order=self.order, call_no=self.call_no, error=error, rows=rows, row_bytes=row_bytes,
                       clock_ns=self.clock_ns, expect=expect, origin=origin, attrs=tuple(v for _, v in self.attrs))
        send = out.encode()
        if dom.order is not None:
            send = send[torch.from_numpy(np.argsort(dom.order))]
        recv = torch.empty_like(send)
        ones = np.ones(dom.size, dtype=np.int64)
        issue(self.ctx, self.tag, dom, Transfer(f"{kind} header", recv, send, ones, ones, HEADER_BYTES, equal=True,
                                                before=lambda: stamp_clock(send, time.monotonic_ns()),
                                                after=partial(self._waits, kind, recv)))
        hdr = Header.decode(dom.from_group(recv.numpy()))
        if error == 0:
            sites = self._watched_site if self.ctx.watcher is not None else (lambda r: None)
            problem = judge(hdr, dom, dist.get_rank(), (self.op, self.call_no, self.order), self.attrs,
                            self._peer_message, sites)
            if problem is not None:
                self.abort(problem)
        return hdr

    def _waits(self, kind: str, recv: torch.Tensor, t0: int, t1: int) -> dict:
        """Microseconds this rank waited for each source: from entering the exchange to the
        moment that source sent its header (its clock, carried in the header), within [0, duration]."""
        clocks = Header.decode(self.domain(kind).from_group(recv.numpy())).clock
        w = (np.clip(clocks - t0, 0, t1 - t0) // 1000).astype(np.int64)
        if kind == "EP":
            self.wait_us = w
        return {"wait_us": w.tolist()}

    def _peer_message(self, origin: int, order: int) -> str | None:
        return self.ctx.recorder.message(f"emu_err/{origin}/{order}")

    def _watched_site(self, rank: int) -> str | None:
        """Where ``rank`` called this op, from its last watch record (this op's own)."""
        raw = self.ctx.recorder.message(f"emu_watch_last/{rank}")
        rec = json.loads(raw) if raw else None
        return rec["site"] if rec and rec["op"] == self.op else None

    def exchange_segments(self, kind: str, send: torch.Tensor, sent: Segments, received: Segments,
                          phase: str) -> torch.Tensor:
        """All-to-all of a segment buffer (``wire.Segments``, peers in group-rank order).

        send: (sent.total, width) uint8.  Returns (received.total, width) uint8.
        """
        dom = self.domain(kind)
        out = self.ctx.scratch("recv", received.total, sent.width)
        issue(self.ctx, self.tag, dom, Transfer(f"{kind} {phase}", out, send, dom.from_group(sent.rows),
                                                dom.from_group(received.rows), sent.width))
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
        issue(self.ctx, self.tag, dom, Transfer(f"{kind} {phase}", out, send.contiguous(),
                                                np.asarray(send_counts, np.int64), np.asarray(recv_counts, np.int64),
                                                width))
        return out

    def abort(self, err: AclnnError) -> None:
        """Tell every domain whose header is still due that this call failed, then raise."""
        code = err.code if isinstance(err, AclnnError) else TILING_ERROR
        origins = getattr(err, "origins", None) or [dist.get_rank()]
        if not isinstance(err, PeerError):          # peers quote this rank's own message
            self.ctx.recorder.message(f"emu_err/{dist.get_rank()}/{self.order}", str(err)[:2000])
        for kind in list(self.pending):
            dom = self.domain(kind)
            if dom is None:
                self.pending.remove(kind)
                continue
            zeros = np.zeros(dom.size, dtype=np.int64)
            self.exchange_header(kind, zeros, 0, zeros, error=code, origin=origins[0])
        raise err

    def add_waits(self, performance_info: torch.Tensor | None) -> None:
        """Accumulate the microseconds this rank waited for each EP source into
        ``performance_info`` (never cleared), indexed by the source's original EP rank."""
        if performance_info is not None and self.wait_us is not None:
            idx = torch.from_numpy(self.ep.ep_index)
            keep = idx < performance_info.numel()
            performance_info.view(-1).index_add_(0, idx[keep], torch.from_numpy(self.wait_us)[keep]
                                                 .to(performance_info.dtype))


def _group_error(req: Request, ep: Domain | None, tp: Domain | None) -> AclnnError | None:
    """The groups must be known and match the attributes (ep_world_size, ranks)."""
    cfg, place = req.cfg, req.place
    c = Checker(req.kind)
    try:
        c.tiling(ep is not None, "group_ep", place.ep_name, "is not a known process group (emu.group_name)")
        c.tiling(ep.size == cfg.ep_world_size, "ep_world_size", cfg.ep_world_size,
                 f"must equal the size of group_ep ({ep.size})")
        c.tiling(ep.rank == place.ep_rank_id, "ep_rank_id", place.ep_rank_id,
                 f"must equal this rank's place in group_ep ({ep.rank})")
        if cfg.tp_world_size == 2:
            c.tiling(tp is not None, "group_tp", place.tp_name, "is not a known process group")
            c.tiling(tp.size == 2, "group_tp", place.tp_name, f"must have 2 ranks (has {tp.size})")
            c.tiling(tp.rank == place.tp_rank_id, "tp_rank_id", place.tp_rank_id,
                     f"must equal this rank's place in group_tp ({tp.rank})")
    except AclnnError as exc:
        return exc
    return None


def open_call(req: Request, checked: Checked, elastic: bool = True) -> Call:
    """Open the call: its EP (and TP) domain, its number, the attributes peers must share.

    A rank whose input failed its checks still takes part in the first exchange of each of
    its domains with an error marker, so that every peer raises at once instead of waiting;
    only a rank without a usable group (unknown group_ep, unusable elastic table) raises on
    its own.  Under active elastic scaling the EP domain is the survivors alone (docs/elastic.md);
    ``elastic=False`` (a chip without elastic scaling) always uses the whole EP group.
    """
    cfg, place = req.cfg, req.place
    ep_pg = resolve_group(place.group_ep)
    tp_pg = resolve_group(place.group_tp) if cfg.tp_world_size == 2 else None
    full = Domain.of("EP", ep_pg) if ep_pg is not None else None
    tp = Domain.of("TP", tp_pg) if tp_pg is not None else None
    error = checked.error or _group_error(req, full, tp)
    table = req.inputs.elastic_info if elastic else None
    remap = usable_remap(table, cfg, place.ep_rank_id, req.kind) if full is not None else None
    if remap is None:
        raise error if error is not None else AclnnError(TILING_ERROR, f"{req.kind}: elastic_info is unusable")
    ep = Domain.survivors(full, remap.survivors(), int(remap.to_new[place.ep_rank_id])) if remap.active else full
    headers = (["TP", "EP"] if req.kind == "combine" else ["EP", "TP"]) if tp is not None else ["EP"]
    ctx = current()
    attrs = checked.prep.agreed[:MAX_ATTRS] if error is None else ()
    order, call_no = ctx.next_call(ep.name, req.kind)
    call = Call(op=req.kind, ep=ep, tp=tp, attrs=attrs, ctx=ctx, call_no=call_no, order=order,
                clock_ns=time.monotonic_ns(), pending=headers)
    if error is not None:
        call.abort(error)
    return call
