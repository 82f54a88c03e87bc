"""The life of one operator call on this rank: open, exchange headers and rows, abort.

Every group a call uses starts with one *header* exchange (:mod:`emu.comm.header`), which
carries the rows too when they fit the group's slot; else they follow in one uneven
``all_to_all_single``, packed (uint8 rows with metadata tails) or bare (straight from and into
the op's tensors, their metadata after the header).  So a bad input
or a mismatched call on one rank makes every rank raise after one exchange, and the world
stays usable.  Each collective waits at most ``EMU_TIMEOUT_S`` seconds (default 60), then
raises naming the rank, the group and the collective (:mod:`emu.comm.transport`).
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..core.checks import Checker, usable_remap
from ..core.errors import TILING_ERROR, AclnnError, EmuError, ErrorKind, PeerError
from ..core.request import Checked, Request
from .context import CommContext, current, transport_mode
from .domain import Domain
from .groups import resolve_group
from .header import HEADER_LEN, MAX_ATTRS, Header, Outgoing, all_alike, clock_of, stamp_clock
from .transport import CallTag, Transfer, issue
from .verdict import judge, relay_kind
from .wire import META_BYTES, Segments, rows_for_meta

HEADER_BYTES = 8 * HEADER_LEN


def slot_bytes(width: int, rows: int) -> int:
    """Bytes per peer of a first exchange that carries up to ``rows`` rows of ``width`` bytes
    (and their metadata) after the header: whole rows (the header in the first ones) when
    ``width`` is a multiple of 8, so that rows are packed straight into the slots; else the
    bytes rounded up to a multiple of 8."""
    if width <= 0 or rows <= 0:
        return 0
    if width % 8 == 0:
        return (-(-HEADER_BYTES // width) + rows + int(rows_for_meta(rows, width))) * width
    return -(-(HEADER_BYTES + (rows + int(rows_for_meta(rows, width))) * width) // 8) * 8


SLOT_FLOOR = 2 << 20                # slots of a rank never cost more than this, or twice its rows


@functools.lru_cache(maxsize=1024)
def slot_plan(peers: int, width: int, per_peer: int, rows: int) -> int:
    """The slot for an op whose ranks send up to ``per_peer`` rows to one peer and ``rows`` in
    all: :func:`slot_bytes`, or 0 when ``peers`` slots exceed max(SLOT_FLOOR, twice the slot
    that ``rows`` would fill).  (A 2-rank TP group, whose ranks send all their rows to the
    one peer, always has its slot.)"""
    nbytes = slot_bytes(width, per_peer)
    return nbytes if peers * nbytes <= max(SLOT_FLOOR, 2 * slot_bytes(width, rows)) else 0


BARE_BYTES = 2 << 20                # rows go bare when one peer's bounded rows carry this many payload bytes
BARE_BYTES_PAIR = 1 << 20           # ... in a 2-rank group, whose collectives cost less


def bare_slot(rows: int) -> int:
    """Bytes per peer of a first exchange that carries the metadata of up to ``rows`` bare rows
    after the header (a multiple of 8)."""
    return HEADER_BYTES + -(-META_BYTES * rows // 8) * 8


@dataclass(frozen=True)
class SlotNeed:
    """What the group's slot must hold for the op's next call, from the agreed attributes.

    per_peer: rows one source may send one peer, bounded to about twice the average; rows: the
    rows a source sends in all; bare_bytes: the payload bytes of a bare row when the op can send
    its rows bare (0: it cannot); bound: the most words that go with them from one source to one
    peer (one per row: the most rows)."""

    per_peer: int
    rows: int
    bare_bytes: int = 0
    bound: int = 0


def plan_slot(peers: int, width: int, need: SlotNeed) -> tuple[int, bool]:
    """(the slot, whether rows go bare) for the op's next call: bare when the op can and one
    peer's rows are large (``BARE_BYTES``, ``BARE_BYTES_PAIR`` in a 2-rank group; whatever their
    size with ``EMU_TRANSPORT=bare``), the slot then holding their words; else :func:`slot_plan`."""
    return _plan_slot(peers, width, need.per_peer, need.rows, need.bare_bytes, need.bound,
                      transport_mode() == "bare")


@functools.lru_cache(maxsize=1024)
def _plan_slot(peers: int, width: int, per_peer: int, rows: int, bare_bytes: int, bound: int,
               always_bare: bool) -> tuple[int, bool]:
    if bare_bytes and (per_peer * bare_bytes >= (BARE_BYTES if peers > 2 else BARE_BYTES_PAIR) or always_bare):
        return bare_slot(bound), True
    return slot_plan(peers, width, per_peer, rows), False


@dataclass(frozen=True)
class BareRows:
    """How an op sends its rows bare, with no wire row around them (``Call.exchange``).

    rows(): (n, H) of one dtype, in wire order (destinations in group order), contiguous;
    words(): the int32 words that travel with the header, destinations in group order (by
    default one metadata word per row); into(m): the (m, H) tensor the m rows received land in,
    sources back to back in group order (the op's output, when that is its layout);
    word_counts(rows): the words to (or from) each peer that sends it (or this rank) ``rows``
    (P,) rows, group order (None: one per row); counts: (P,) rows per logical peer when they go
    bare (None: ``Outbound.counts``, when packed rows carry nothing more)."""

    rows: Callable[[], torch.Tensor]
    words: Callable[[], np.ndarray]
    into: Callable[[int], torch.Tensor]
    word_counts: Callable[[np.ndarray], np.ndarray] | None = None
    counts: np.ndarray | None = None

    def count_words(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.word_counts is None else self.word_counts(rows)


@dataclass(frozen=True)
class Outbound:
    """One direction's rows on one domain: ``counts`` (P,) rows per logical peer, ``width`` bytes
    each when packed, ``expect`` (P,) rows expected back (combine's cross-check), ``fill(segments,
    buffer)`` packs them into a (rows, width) uint8 buffer at the segments' places; ``bare``: how
    they go bare (None: never)."""

    counts: np.ndarray
    width: int
    expect: np.ndarray
    fill: Callable[[Segments, torch.Tensor], None]
    bare: BareRows | None = None


def _slot_words(counts: np.ndarray, cap: int, slot: int) -> np.ndarray:
    """Int32 word of a (P, slot) buffer that carries each metadata word after the header, the
    first ``min(counts[p], cap)`` rows of each peer p (group order) in order."""
    n = np.minimum(counts, cap)
    first = np.arange(n.size, dtype=np.int64) * (slot // META_BYTES) + HEADER_BYTES // META_BYTES
    seg = np.repeat(np.arange(n.size), n)
    return first[seg] + np.arange(seg.size) - (np.cumsum(n) - n)[seg]


def _kept(counts: np.ndarray, cap: int) -> np.ndarray:
    """Which rows' metadata words fit: the first ``cap`` of each peer's ``counts``."""
    seg = np.repeat(np.arange(counts.size), counts)
    return np.arange(seg.size) - (np.cumsum(counts) - counts)[seg] < cap


def _fill_slots(fill: Callable[[Segments, torch.Tensor], None], sent: Segments, rows: int,
                send: torch.Tensor) -> None:
    """Pack straight into the (P, slot) send buffer seen as rows of ``sent.width`` bytes."""
    fill(sent, send.view(rows, sent.width))


def _into_slots(packed: torch.Tensor, sent: Segments, send: torch.Tensor) -> None:
    """Copy each peer's segment of ``packed`` into its slot of ``send``, after the header."""
    flat = packed.view(-1)
    for p in np.flatnonzero(sent.rows):
        a, n = int(sent.start[p]) * sent.width, int(sent.rows[p]) * sent.width
        send[p, HEADER_BYTES:HEADER_BYTES + n] = flat[a:a + n]


def _from_slots(recv: torch.Tensor, rows: torch.Tensor, received: Segments, inline: np.ndarray,
                per: int, head: int) -> None:
    """Copy the inline sources' segments from their slots into ``rows`` (contiguous layout);
    ``per`` / ``head``: the slot's rows and header rows when it is a whole number of rows."""
    flat, width = rows.view(-1), received.width
    src = recv.view(-1, width) if per else None
    for p in np.flatnonzero(inline & (received.rows > 0)):
        a, n = int(received.start[p]), int(received.rows[p])
        if per:
            rows[a:a + n] = src[p * per + head:p * per + head + n]
        else:
            flat[a * width:(a + n) * width] = recv[p, HEADER_BYTES:HEADER_BYTES + n * width]


@dataclass(frozen=True)
class SlotBuffers:
    """The (P, slot) uint8 send and receive buffers of a first exchange, their header blocks
    as (P, HEADER_LEN) int64 numpy views, and P ones (the equal splits)."""

    send: torch.Tensor
    recv: torch.Tensor
    head_out: np.ndarray
    head_in: np.ndarray
    ones: np.ndarray

    @classmethod
    def of(cls, ctx: CommContext, peers: int, nbytes: int) -> "SlotBuffers":
        """The context's reusable buffers for ``peers`` slots of ``nbytes``, with their views made
        once per shape (made again when the context takes fresh buffers)."""
        key = ("slots", peers, nbytes)
        bufs = ctx.wire_buffers.get("slot_send"), ctx.wire_buffers.get("slot_recv")
        got = ctx.views.get(key)
        if got is not None and got[0] is bufs[0] and got[1] is bufs[1]:
            return got[2]
        send, recv = ctx.scratch("slot_send", peers, nbytes), ctx.scratch("slot_recv", peers, nbytes)
        made = cls(send, recv, send[:, :HEADER_BYTES].view(torch.int64).numpy(),
                   recv[:, :HEADER_BYTES].view(torch.int64).numpy(), np.ones(peers, dtype=np.int64))
        ctx.views[key] = (ctx.wire_buffers["slot_send"], ctx.wire_buffers["slot_recv"], made)
        return made


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
    _ep_clocks: tuple | None = None                       # what the EP header's waits are made of
    _values: tuple[int, ...] | None = None                # the attributes' values, as headers carry them

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
                        expect: np.ndarray, error: int = 0, origin: int = -1, relayed: int = 0) -> Header:
        """Header all-to-all on domain ``kind``: tell every peer ``rows`` (what this rank sends
        it), ``row_bytes`` and ``expect`` (what it expects back); returns every source's header.

        Raises PeerError on every rank when a peer reported an error or disagrees on the op,
        the call number or an attribute (after first telling the remaining domains).
        """
        out = self._outgoing(rows, row_bytes, expect, error, origin, relayed=relayed)
        return self._first_exchange(kind, out, None)[0]

    def _outgoing(self, rows: np.ndarray, row_bytes: int, expect: np.ndarray, error: int = 0, origin: int = -1,
                  rides: str = "", relayed: int = 0) -> Outgoing:
        """The header this rank sends; ``rides``: how its rows travel, "inline" (after the
        header), "later" (packed, in a second exchange), "bare" (in a second exchange, bare), or
        "" (it sends none)."""
        return Outgoing(op=self.op, order=self.order, call_no=self.call_no, error=error, rows=rows,
                        row_bytes=row_bytes, clock_ns=self.clock_ns, expect=expect, origin=origin,
                        attrs=self.attr_values, inline=rides == "inline", later=rides in ("later", "bare"),
                        kind=relayed, bare=rides == "bare")

    @property
    def attr_values(self) -> tuple[int, ...]:
        if self._values is None:
            self._values = tuple([v for _, v in self.attrs])
        return self._values

    def _first_exchange(self, kind: str, out: Outgoing,
                        fill: Callable[[torch.Tensor], None] | None) -> tuple[Header, torch.Tensor]:
        """The call's first exchange on ``kind``: every peer's header at the start of a slot
        of the group's current size (``CommContext.slot``; just the header before any call
        passed there).  ``fill(send)`` writes this rank's inline rows into the (P, slot) uint8
        send buffer after the headers.  Returns the headers (judged) and the (P, slot) uint8
        receive buffer, group order."""
        dom = self.domain(kind)
        if kind in self.pending:
            self.pending.remove(kind)
        nbytes = max(self.ctx.slot(dom.name), HEADER_BYTES)
        bufs = SlotBuffers.of(self.ctx, dom.size, nbytes)
        send, recv, head_out, head_in, ones = bufs.send, bufs.recv, bufs.head_out, bufs.head_in, bufs.ones
        if fill is not None:
            fill(send)
        out.encode_into(head_out, None if dom.order is None else np.argsort(dom.order))
        issue(self.ctx, self.tag, dom, Transfer(f"{kind} header", recv, send, ones, ones, nbytes, equal=True,
                                                before=lambda: stamp_clock(head_out, time.monotonic_ns()),
                                                after=partial(self._waits, kind, head_in)))
        hdr = Header.decode(dom.from_group(head_in.copy()))      # the buffer is reused
        if out.error == 0 and not all_alike(head_in, head_out[0]):
            sites = self._watched_site if self.ctx.watcher is not None else (lambda r: None)
            problem = judge(hdr, dom, dist.get_rank(), (self.op, self.call_no, self.order), self.attrs,
                            self._peer_message, sites, self._peer_verdict)
            if problem is not None:
                self.abort(problem)
        return hdr, recv

    def exchange(self, kind: str, out: Outbound, need: SlotNeed,
                 phase: str = "rows") -> tuple[Header, torch.Tensor, Segments]:
        """Header and rows of one direction on ``kind`` (``out``), in one collective when they fit.

        When the group has a slot (``CommContext.slot``) and this rank's rows for every peer fit
        it, they travel after the header in the same exchange (packed straight into the slots
        when the slot is a whole number of rows, else copied there); otherwise this rank says so
        in its header and every rank takes part in a second, uneven exchange (so a rank never
        waits for a collective the others skip).  When the op can send its rows bare
        (``out.bare``) and :meth:`goes_bare`, the header carries their words and the rows go
        straight from the op's tensor into the receiver's (:meth:`_exchange_bare`).  ``need``: what the slot must hold for this op's next call
        (:func:`plan_slot`, from the agreed attributes: no slot when the P slots would cost
        much more memory and bytes than the rows themselves).  Returns the headers and the
        received rows with where each source's segment lies, sources in group order."""
        if out.bare is not None and self.goes_bare(kind, need):
            return self._exchange_bare(kind, out, need, phase)
        counts, width, expect, fill = out.counts, out.width, out.expect, out.fill
        dom = self.domain(kind)
        P = dom.size
        sent, per, head, inline = self._placement(kind, counts, width)
        later = not inline and bool(np.asarray(counts).sum())
        rides = "inline" if inline else "later" if later else ""
        packed = None
        if inline and per:
            into = partial(_fill_slots, fill, sent, P * per)
        elif inline:
            packed = self.ctx.scratch("send", sent.total, width)
            fill(sent, packed)
            into = partial(_into_slots, packed, sent)
        else:
            into = None
        hdr, recv = self._first_exchange(kind, self._outgoing(counts, width, expect, rides=rides), into)
        self._same_transport(kind, hdr, False)
        self.ctx.set_slot(dom.name, self.op, *plan_slot(P, width, need))
        from_g = dom.to_group(hdr.rows)
        if per and not hdr.later.any():                  # every row arrived in place: no copy
            return hdr, recv.view(P * per, width), Segments(from_g, width, start=sent.start, total=P * per)
        inline_g = dom.to_group(hdr.inline.astype(np.int64)).astype(bool)
        received = Segments(from_g, width)
        mixed = bool((inline_g & (from_g > 0)).any())        # some rows came inline: gather them in one buffer
        rows = self.ctx.scratch("rows", received.total, width) if mixed or not hdr.later.any() else None
        if rows is not None:
            _from_slots(recv, rows, received, inline_g, per, head)
        if hdr.later.any():
            if later:
                sent = Segments(dom.to_group(counts), width)
                packed = self.ctx.scratch("send", sent.total, width)
                fill(sent, packed)
            else:
                sent, packed = Segments(np.zeros(P, np.int64), width), torch.empty(0, width, dtype=torch.uint8)
            second = Segments(np.where(inline_g, 0, from_g), width)
            got = self.exchange_segments(kind, packed, sent, second, phase)
            if rows is None:                             # every row came in the second exchange: no copy
                return hdr, got, second
            for p in np.flatnonzero(second.n):
                rows[received.start[p]:received.start[p] + received.rows[p]] = \
                    got[second.start[p]:second.start[p] + second.rows[p]]
        return hdr, rows, received

    def _exchange_bare(self, kind: str, out: Outbound, need: SlotNeed, phase: str) -> tuple[Header, torch.Tensor, Segments]:
        """:meth:`exchange` of bare rows: the header exchange carries each peer's words (the
        rows' metadata) after its header (the group's slot holds them: :func:`bare_slot` of the
        agreed bound), then one uneven all-to-all moves the payload rows from
        ``out.bare.rows()`` straight into ``out.bare.into(m)``.  Returns that tensor as (m, row
        bytes) uint8 with its segments, the words carried apart (``Segments.meta``).  A source
        that sends some peer more words than the slot holds (only inputs not from their
        dispatch can) makes both ends raise after the rows exchange."""
        dom, bare = self.domain(kind), out.bare
        P = dom.size
        counts = out.counts if bare.counts is None else bare.counts
        counts_g = dom.to_group(counts)
        words_to = bare.count_words(counts_g)
        slot = max(self.ctx.slot(dom.name), HEADER_BYTES)
        cap = (slot - HEADER_BYTES) // META_BYTES
        sending = bool(counts_g.any())
        rows = bare.rows() if sending else None
        row_bytes = rows.shape[1] * rows.element_size() if sending else 0

        def meta_into(send: torch.Tensor) -> None:
            if words_to.any():
                meta = np.ascontiguousarray(bare.words(), np.int32)
                words = send.view(-1).view(torch.int32)
                keep = slice(None) if words_to.max() <= cap else _kept(words_to, cap)
                words[torch.from_numpy(_slot_words(words_to, cap, slot))] = torch.from_numpy(meta[keep])

        hdr, recv = self._first_exchange(kind, self._outgoing(counts, row_bytes, out.expect,
                                                              rides="bare" if sending else ""), meta_into)
        self._same_transport(kind, hdr, True)
        self.ctx.bare_exchanges += 1
        self.ctx.set_slot(dom.name, self.op, *plan_slot(P, out.width, need))
        from_g = dom.to_group(hdr.rows)
        words_from = bare.count_words(from_g)
        meta = recv.view(-1).view(torch.int32).numpy()[_slot_words(words_from, cap, slot)]
        got = bare.into(int(from_g.sum()))
        if hdr.later.any():
            send = rows if sending else got[:0]
            issue(self.ctx, self.tag, dom, Transfer(f"{kind} {phase}", got, send, np.asarray(counts, np.int64),
                                                    hdr.rows.copy(), got.shape[1] * got.element_size()))
        if max(int(words_from.max(initial=0)), int(words_to.max(initial=0))) > cap:
            bad = sorted({dom.ranks[i] for i in np.flatnonzero((words_from > cap) | (words_to > cap))})
            raise PeerError(TILING_ERROR, f"{self.op} call #{self.call_no} on {dom.describe()}: rows between this "
                            f"rank and {bad} exceed the {cap} one source can send one peer; the inputs are not "
                            f"from the dispatch they claim", kind=ErrorKind.MISMATCHED_DATA, culprits=tuple(bad))
        wire = got.view(torch.uint8)
        return hdr, wire, Segments(from_g, wire.shape[1], meta=meta)

    def _same_transport(self, kind: str, hdr: Header, bare: bool) -> None:
        """Every source sends its rows as this rank does, bare or not (ranks that run with
        different ``EMU_TRANSPORT`` would corrupt the rows): else raise, on every rank at once."""
        if (hdr.any_bare if not bare else
                bool((~hdr.bare & hdr.later).any()) or bool(hdr.inline.any())):
            dom = self.domain(kind)
            raise PeerError(TILING_ERROR, f"{self.op} call #{self.call_no} on {dom.describe()}: ranks send their "
                            f"rows in different ways (bare or packed); EMU_TRANSPORT must be the same on every rank",
                            kind=ErrorKind.MISMATCHED_CALL)

    def goes_bare(self, kind: str, need: SlotNeed) -> bool:
        """:meth:`exchange` on ``kind`` sends this op's rows bare when it can: the op's previous
        call on the group planned it, and the group's slot holds the words of this call's bound
        (``need``, from its agreed attributes: a call whose bound grew sends packed rows)."""
        name = self.domain(kind).name
        return self.ctx.goes_bare(name, self.op) and bare_slot(need.bound) <= self.ctx.slot(name)

    def _placement(self, kind: str, counts: np.ndarray, width: int) -> tuple[Segments, int, int, bool]:
        """Where :meth:`exchange` puts ``counts`` rows of ``width`` bytes on ``kind``: their
        segments, the slot's rows and header rows when it is a whole number of rows (else 0, 0),
        and whether they travel inline, after the header in the first exchange."""
        dom = self.domain(kind)
        P = dom.size
        counts_g = dom.to_group(counts)
        slot = self.ctx.slot(dom.name)
        per, head = (slot // width, -(-HEADER_BYTES // width)) if slot and slot % width == 0 else (0, 0)
        sent = Segments(counts_g, width, start=np.arange(P) * per + head, total=P * per) if per \
            else Segments(counts_g, width)
        need = int(sent.rows.max(initial=0))
        return sent, per, head, need <= per - head if per else (slot > 0 and need * width <= slot - HEADER_BYTES)

    def packs_first(self, kind: str, counts: np.ndarray, width: int) -> bool:
        """:meth:`exchange` of these rows calls its ``fill`` before any collective of the call on
        ``kind`` (they travel inline): only then may ``fill`` read a wire buffer of an earlier
        exchange (the TP peer's rows), which the header exchange would overwrite."""
        return self._placement(kind, counts, width)[3]

    def _waits(self, kind: str, head: np.ndarray, t0: int, t1: int, traced: bool) -> dict:
        """Keep what the waits of this exchange are made of (the sources' clocks, t0, t1); the
        waits themselves are worked out only when read (:meth:`waits_us`, the trace)."""
        dom = self.domain(kind)
        clocks = dom.from_group(clock_of(head)).copy()       # the buffer is reused
        if kind == "EP":
            self._ep_clocks = (clocks, t0, t1, dom.rank)
        return {"wait_us": _waits_us(clocks, t0, t1, dom.rank).tolist()} if traced else {}

    @property
    def wait_us(self) -> np.ndarray | None:
        """(W,) microseconds this rank waited for each EP source's data in the call's first
        exchange (:func:`_waits_us`), or None before it."""
        return None if self._ep_clocks is None else _waits_us(*self._ep_clocks)

    def _peer_message(self, origin: int, order: int) -> str | None:
        return self.ctx.recorder.message(f"emu_err/{origin}/{order}")

    def _peer_verdict(self, rank: int, order: int) -> dict | None:
        raw = self.ctx.recorder.message(f"emu_verdict/{rank}/{order}")
        return json.loads(raw) if raw else None

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
        """Tell every domain whose header is still due that this call failed, then raise: a
        rejected input by its origin, a verdict of this group (mismatched attribute or call) by
        its kind, with its culprits left in the store."""
        me = dist.get_rank()
        code = err.code if isinstance(err, AclnnError) else TILING_ERROR
        relayed = relay_kind(err)
        origins = getattr(err, "origins", None) or ([] if relayed else [me])
        if not isinstance(err, PeerError):          # peers quote this rank's own message
            self.ctx.recorder.message(f"emu_err/{me}/{self.order}", str(err)[:2000])
        if relayed and self.pending:
            self.ctx.recorder.message(f"emu_verdict/{me}/{self.order}", json.dumps(
                {"culprits": list(getattr(err, "culprits", ())), "text": str(err).splitlines()[0][:1000]}))
        for kind in list(self.pending):
            dom = self.domain(kind)
            if dom is None:
                self.pending.remove(kind)
                continue
            zeros = np.zeros(dom.size, dtype=np.int64)
            try:
                self.exchange_header(kind, zeros, 0, zeros, error=code, origin=origins[0] if origins else -1,
                                     relayed=relayed)
            except EmuError:
                pass                        # a peer failed too; this rank's own error is the one it raises
        raise err

    def add_waits(self, performance_info: torch.Tensor | None) -> None:
        """Accumulate the microseconds this rank waited for each EP source into
        ``performance_info`` (never cleared), indexed by the source's original EP rank."""
        waits = self.wait_us if performance_info is not None else None
        if waits is not None:
            idx = torch.from_numpy(self.ep.ep_index)
            keep = idx < performance_info.numel()
            performance_info.view(-1).index_add_(0, idx[keep], torch.from_numpy(waits)[keep].to(performance_info.dtype))


def _waits_us(clocks: np.ndarray, t0: int, t1: int, me: int) -> np.ndarray:
    """Microseconds this rank waited for each source's data, within [0, duration]: how late the
    source sent it (its clock, carried in the header, against entering the exchange), plus the
    transfer once the last source had sent (every source's data crosses it, so a rank that
    arrives last still waits for data, as on the device); 0 for itself."""
    transfer = max(t1 - max(t0, int(clocks.max())), 0)
    w = np.minimum(np.maximum(clocks - t0, 0) + transfer, t1 - t0) // 1000
    w[me] = 0
    return w


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


def _tp_domain(req: Request, rejected: bool) -> Domain | None:
    """The TP domain: with tp_world_size 2, or on a rank that rejected its input and passed a
    tp_world_size no job uses (neither 0, 1 nor 2) with a 2-rank group_tp holding it: its TP peer
    waits there."""
    tp = req.cfg.tp_world_size
    if tp != 2 and not (rejected and tp not in (0, 1)):
        return None
    pg = resolve_group(req.place.group_tp)
    if pg is None or (tp != 2 and (dist.get_world_size(pg) != 2 or dist.get_rank(pg) < 0)):
        return None
    return Domain.of("TP", pg)


def open_call(req: Request, checked: Checked, elastic: bool = True) -> Call:
    """Open the call: its EP (and TP) domain, its number, the attributes peers must share.

    A rank whose input failed its checks still takes part in the first exchange of each of
    its domains with an error marker, so that every peer raises at once instead of waiting
    (its domains come from where it actually is: the group's size and its place in it, and the
    elastic table's structure, whatever the attributes say).  Only a rank without a usable group
    (unknown group_ep, an elastic table naming no domain) raises on its own; its farewell tells
    the peers waiting for it (:func:`~emu.comm.transport.issue`), who abandon the group: every
    member then builds its next generation, where call numbers start afresh.
    Under active elastic scaling the EP domain is the survivors alone (docs/elastic.md);
    ``elastic=False`` (a chip without elastic scaling) always uses the whole EP group.
    """
    place = req.place
    ep_pg = resolve_group(place.group_ep)
    full = Domain.of("EP", ep_pg) if ep_pg is not None else None
    tp = _tp_domain(req, checked.error is not None)
    error = checked.error or _group_error(req, full, tp)
    table = req.inputs.elastic_info if elastic else None
    remap = usable_remap(table, full.size, full.rank) if full is not None else None
    if remap is None:
        raise error if error is not None else AclnnError(TILING_ERROR, f"{req.kind}: elastic_info is unusable")
    ep = Domain.survivors(full, remap.survivors(), int(remap.to_new[full.rank])) if remap.active else full
    ep.bind()
    if tp is not None:
        tp.bind()
    headers = (["TP", "EP"] if req.kind == "combine" else ["EP", "TP"]) if tp is not None else ["EP"]
    ctx = current()
    attrs = checked.prep.agreed[:MAX_ATTRS] if error is None else ()
    order, call_no = ctx.next_call(ep.name, req.kind)
    call = Call(op=req.kind, ep=ep, tp=tp, attrs=attrs, ctx=ctx, call_no=call_no, order=order,
                clock_ns=time.monotonic_ns(), pending=headers)
    if error is not None:
        call.abort(error)
    return call
