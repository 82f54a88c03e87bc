"""Atlas A3 dispatch on this rank, phase by phase (docs/dispatch.md).

Notation as in :mod:`emu.core.attrs`.  Phases:

    plan rows        which rows this rank sends where, in wire order (destination by group rank)
    exchange         EP header (rows per peer, row size, call number, agreed attributes) with
                     the packed rows (token rows, or int8 rows + fp32 scale; metadata tails)
                     in each peer's slot when they fit, else a second, uneven all-to-all
    lay out          expand_x / dynamic_scales / assist triples / ep_recv_counts, blocks
                     local-expert major, source minor
    TP all-gather    (tp 2) the TP peer's rows appended after ours, with its ep_recv_counts
    count outputs    expert_token_nums

Collectives per call: EP header with the rows (1; 2 on a group's first call of the op, when
some rank's rows exceed the slot, or when they go bare: large rows, quant mode 0, one expert
per rank, received straight into expand_x), and with tp = 2 the same on the TP group (1, or 2:
bare rows go from expand_x straight into the peer's).
Wire row of the EP exchange: payload (H of XT, or with quant 2 H int8 + a 4-byte fp32 scale,
padded to a multiple of 8 bytes); each segment's tail carries the rows' metadata (t, k, local
expert); the source is the segment (``wire.Segments``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..comm.call import BareRows, Call, Outbound, SlotNeed
from ..comm.domain import Domain
from ..comm.wire import Segments, pack_meta, unpack_meta
from ..core.attrs import Geometry
from ..core.inputs import DispatchInputs
from ..core.layout import DispatchOutputs, expert_token_nums, recv_layout
from ..core.numerics import dynamic_quant
from ..core.plan import send_plan
from ..core.request import Prepared
from . import native


@dataclass(frozen=True)
class WireRows:
    """The rows this rank sends, in wire order (destinations by group rank, then the plan's
    order): token t, slot k, local expert on the destination, smooth-scale row; all (n,) int64.
    counts: (W,) rows per logical destination."""

    token: np.ndarray
    slot: np.ndarray
    local: np.ndarray
    smooth_row: np.ndarray
    counts: np.ndarray


def dispatch(call: Call, prep: Prepared, inp: DispatchInputs) -> DispatchOutputs:
    """Run dispatch for this rank: the 7 outputs at the eager shapes of ``prep``."""
    return send_rows(call, prep, inp, plan_rows(call.ep, prep.route, prep, inp))


def send_rows(call: Call, prep: Prepared, inp: DispatchInputs, rows: WireRows) -> DispatchOutputs:
    """Every phase after the plan: exchange ``rows``, lay out, TP all-gather, count outputs."""
    geom = prep.route
    quant = prep.cfg.quant_mode == 2
    width = quant_width(geom.H) if quant else xt_width(geom.H, inp.x.element_size())
    expect = int(rows.counts.sum()) * (2 if geom.tp_active else 1)        # about what this rank receives
    out = DispatchOutputs.allocate(prep.shapes, geom.H, torch.int8 if quant else prep.xt, expect)
    bare = None if quant or geom.L != 1 else bare_rows(call, prep, inp, rows, out)
    _, recv, received = call.exchange(
        "EP", Outbound(rows.counts, width, np.zeros(call.ep.size, np.int64),
                       lambda seg, buf: pack_rows(inp, rows, seg, quant, buf), bare),
        slot_need(geom, 0 if bare is None else geom.H * inp.x.element_size()))
    own, counts = lay_out(call.ep, prep, recv, received, out)
    total = own
    if geom.tp_active:
        total += tp_all_gather(call, geom, out, own, counts)
    count_outputs(geom, prep, out, counts, total)
    out.clear_unwritten(total, total if quant else 0, 3 * own)
    return out


def plan_rows(dom: Domain, geom: Geometry, prep: Prepared, inp: DispatchInputs) -> WireRows:
    """The send plan of this rank (docs/dispatch.md), reordered so that destinations follow
    the group's rank order (they differ under elastic scaling)."""
    plan = send_plan(geom, dom.rank, inp.expert_ids, prep.act)
    cols = (plan.token, plan.slot, plan.local, plan.smooth_row)
    if dom.order is not None:
        by_group = np.argsort(dom.order[plan.dest], kind="stable")
        cols = tuple(c[by_group] for c in cols)
    return WireRows(*cols, counts=plan.counts)


def quant_width(h: int) -> int:
    """Bytes of a quant-mode-2 wire row: H int8 and the row's fp32 scale, padded to a multiple
    of 8 so that a slot holds whole rows (rows are then packed into and laid out of the slots
    straight, with no copy between them)."""
    return -(-(h + 4) // 8) * 8


def xt_width(h: int, size: int) -> int:
    """Bytes of a wire row of H XT values (``size`` bytes each): for 2-byte XT, H values padded
    to twice :func:`quant_width` (8 to 22 bytes more; 16 for H a multiple of 8), so that every
    op's rows on a group (XT rows of dispatch and combine, int8 rows of quant mode 2) tile the
    group's one slot and are packed into and laid out of it straight (``Call.exchange``)."""
    return 2 * quant_width(h) if size == 2 else h * size


def slot_need(geom: Geometry, bare_bytes: int = 0) -> SlotNeed:
    """What a slot of the EP header exchange must hold for the op's next call (``SlotNeed``):
    the rows one source may send one destination, bounded to twice the average, and the rows
    a source sends in all (docs/performance.md); with ``bare_bytes`` (the op can send its
    rows bare, that many payload bytes each), the most rows one source can send one
    destination: a MoE rank at most min(K, L) copies of each of its maxBs tokens, a shared
    rank one; combine returns them."""
    bound = geom.max_bs * max(min(geom.K, geom.L), 1)
    return SlotNeed(min(bound, 2 * -(-geom.max_bs * geom.K // geom.W) + 2), geom.max_bs * (geom.K + geom.Ns),
                    bare_bytes, bound)


def bare_rows(call: Call, prep: Prepared, inp: DispatchInputs, rows: WireRows, out: DispatchOutputs) -> BareRows:
    """Dispatch's rows bare (quant mode 0, one local expert): x's rows gathered in wire order,
    received straight into expand_x when that is their layout (blocks source-major in group
    order, and they fit), else into a buffer laid out from (:func:`lay_out`)."""
    x, geom = inp.x, prep.route
    row_bytes = geom.H * x.element_size()
    in_place = geom.recv_blocks(call.ep.rank) == geom.W and call.ep.order is None

    def gathered() -> torch.Tensor:
        buf = call.ctx.scratch("send", rows.token.size, row_bytes).view(x.dtype)
        torch.index_select(x, 0, torch.from_numpy(rows.token), out=buf)
        return buf

    def into(m: int) -> torch.Tensor:
        if in_place and m <= out.expand_x.shape[0]:
            return out.expand_x[:m]
        return call.ctx.scratch("rows", m, row_bytes).view(x.dtype)

    return BareRows(gathered, lambda: pack_meta(rows.token, rows.slot, rows.local), into)


def _quantise_copies(x: torch.Tensor, scales: torch.Tensor | None, token: np.ndarray,
                     smooth_row: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic int8 copies for the rows to send (docs/quantisation.md): (u, H) int8 and (u,)
    fp32 for the u distinct copies, and (n,) the distinct copy of every row to send.

    A copy depends only on (token, smooth row) (only on the token without smooth scales), so
    each distinct pair is quantised once and gathered per row: bit-identical, K times less work."""
    per = scales.shape[0] if scales is not None else 1
    key = token * per + (smooth_row if scales is not None else 0)
    uniq, inverse = np.unique(key, return_inverse=True)
    got = native.dynamic_quant(x, uniq // per, scales, uniq % per)
    if got is None:
        u_tok = torch.from_numpy(uniq // per)
        smooth = scales[torch.from_numpy(uniq % per)] if scales is not None else None
        got = dynamic_quant(x.index_select(0, u_tok), smooth)
    return got[0], got[1], torch.from_numpy(inverse.reshape(-1))


def pack_rows(inp: DispatchInputs, rows: WireRows, sent: Segments, quant: bool, send: torch.Tensor) -> None:
    """Fill the (sent.total, width) uint8 ``send`` buffer: each peer's payload rows gathered
    straight into its segment (quantised with quant mode 2), then the segment's metadata tail."""
    x, h = inp.x, inp.x.shape[1]
    meta = (rows.token, rows.slot, rows.local)
    if quant:
        q, scale, inv = _quantise_copies(x, inp.scales, rows.token, rows.smooth_row)
        if native.pack_rows(send, sent.width, sent.start, sent.n, q, inv.numpy(), scale, meta):
            return
        src, index = (q.view(torch.uint8), scale.view(torch.uint8).view(-1, 4)), inv.numpy()
        dst = (send[:, :h], send[:, h:h + 4])
    else:
        if native.pack_rows(send, sent.width, sent.start, sent.n, x, rows.token, None, meta):
            return
        src, index, dst = (x,), rows.token, (send.view(x.dtype)[:, :h],)       # (total, H)
    sent.gather(src, index, dst)
    sent.write_meta(send, pack_meta(rows.token, rows.slot, rows.local))


def lay_out(dom: Domain, prep: Prepared, recv: torch.Tensor, received: Segments,
            out: DispatchOutputs) -> tuple[int, np.ndarray]:
    """Place the received rows into ``out`` (docs/dispatch.md): blocks local-expert major,
    source minor (bare rows may have landed in place: then only the assist triples and
    counts are written).  Returns the rows received and ep_recv_counts (W*L_r,)."""
    geom, h = prep.route, prep.route.H
    me = dom.rank
    quant = out.expand_x.dtype == torch.int8
    blocks = geom.recv_blocks(me)
    if recv.data_ptr() == out.expand_x.data_ptr() and received.meta is not None:
        return _landed(dom, received, out), out.ep_recv_counts.numpy()[:blocks].astype(np.int64)
    own = native.dispatch_layout(recv, received, dom.group_to_logical(),
                                 (geom.W, blocks, h * out.expand_x.element_size(), prep.shapes.capacity),
                                 (out.expand_x, out.dynamic_scales if quant else None, out.assist_info_for_combine,
                                  out.ep_recv_counts))
    if own is not None:
        return own, out.ep_recv_counts.numpy()[:blocks].astype(np.int64)
    t, k, loc = unpack_meta(received.read_meta(recv))
    src = np.repeat(dom.group_to_logical(), received.n)
    lay = recv_layout(geom, me, src, loc)
    own = int(lay.order.size)
    rows_idx = torch.from_numpy(received.payload_index()[lay.order])
    if quant:                                 # int8 rows and their scales gathered straight into the outputs
        torch.index_select(recv[:, :h], 0, rows_idx, out=out.expand_x[:own].view(torch.uint8))
        torch.index_select(recv[:, h:h + 4], 0, rows_idx, out=out.dynamic_scales[:own].view(torch.uint8).view(own, 4))
    else:
        torch.index_select(recv.view(prep.xt)[:, :h], 0, rows_idx, out=out.expand_x[:own])
    out.assist_info_for_combine.numpy()[:3 * own] = np.stack([src, t, k], axis=1)[lay.order].reshape(-1)
    out.ep_recv_counts.numpy()[:blocks] = lay.ep_recv_counts
    return own, lay.ep_recv_counts


def _landed(dom: Domain, received: Segments, out: DispatchOutputs) -> int:
    """The assist triples and ep_recv_counts of bare rows that landed in expand_x in their
    layout (one block per source, sources in order): returns the rows."""
    t, k, _ = unpack_meta(received.meta)
    own = int(received.n.sum())
    tri = out.assist_info_for_combine.numpy()[:3 * own].reshape(own, 3)
    tri[:, 0] = np.repeat(np.arange(received.n.size), received.n)
    tri[:, 1], tri[:, 2] = t, k
    out.ep_recv_counts.numpy()[:received.n.size] = np.cumsum(received.n)
    return own


def tp_all_gather(call: Call, geom: Geometry, out: DispatchOutputs, own: int, own_cum: np.ndarray) -> int:
    """TP all-gather-v (docs/dispatch.md): append the peer's EP rows after ours; returns peer rows.

    One exchange on the TP group carries the header and, once the group has a slot, the rows
    (``Call.exchange``).  The sender's own epRecvCounts (W int32) travel as trailing rows of its
    segment, so a peer with zero rows still delivers them.  Bare (large rows): the rows go
    straight from our expand_x into the peer's, and the counts (with quant mode 2 the rows'
    scales) with the header.
    """
    tp = call.tp
    me, peer = tp.rank, 1 - tp.rank
    at = peer if tp.order is None else int(tp.order[peer])          # the peer's segment (group order)
    quant = out.expand_x.dtype == torch.int8
    h = geom.H
    payload = h * out.expand_x.element_size()
    width = quant_width(h) if quant else xt_width(h, out.expand_x.element_size())
    tail = -(-4 * geom.W // width)
    counts = np.zeros(2, np.int64)
    counts[peer] = own + tail
    counts_words = np.asarray(own_cum[:geom.W], np.int32)

    def fill(seg: Segments, buf: torch.Tensor) -> None:
        a = int(seg.start[at])
        buf[a:a + own, :payload].copy_(out.expand_x[:own].view(torch.uint8).view(own, payload))
        if quant:
            buf[a:a + own, h:h + 4].copy_(out.dynamic_scales[:own].view(torch.uint8).view(own, 4))
        counts_rows = buf[a + own:a + own + tail].view(-1)
        counts_rows.zero_()
        counts_rows[:4 * geom.W] = torch.from_numpy(counts_words).view(torch.uint8)

    def words() -> np.ndarray:
        return np.concatenate([counts_words, out.dynamic_scales[:own].numpy().view(np.int32)]) if quant \
            else counts_words

    def word_counts(rows: np.ndarray) -> np.ndarray:
        got = np.zeros(2, np.int64)
        got[at] = geom.W + (int(rows[at]) if quant else 0)
        return got

    def into(m: int) -> torch.Tensor:
        if own + m <= out.expand_x.shape[0]:
            return out.expand_x[own:own + m]
        return call.ctx.scratch("tp_rows", m, payload).view(out.expand_x.dtype)

    sending = np.zeros(2, np.int64)
    sending[peer] = own
    bare = BareRows(lambda: out.expand_x[:own], words, into, word_counts, sending)
    most = max(geom.a_moe, geom.a_shared) + tail              # the same on both TP ranks
    _, recv, received = call.exchange(
        "TP", Outbound(counts, width, np.zeros(2, np.int64), fill, bare),
        SlotNeed(most, most, payload, geom.W + (most if quant else 0)), "all-gather")
    if received.meta is not None:                                 # bare: the rows came, their words apart
        peer_rows = int(received.n[at])
        if recv.data_ptr() != out.expand_x[own:].data_ptr():
            out.expand_x[own:own + peer_rows].view(torch.uint8).view(peer_rows, payload).copy_(recv)
        if quant:
            out.dynamic_scales[own:own + peer_rows].numpy().view(np.int32)[:] = received.meta[geom.W:]
        out.ep_recv_counts[geom.W:2 * geom.W] = torch.from_numpy(received.meta[:geom.W].copy())
    else:
        a = int(received.start[at])
        peer_rows = int(received.n[at]) - tail
        out.expand_x[own:own + peer_rows].view(torch.uint8).view(peer_rows, payload).copy_(
            recv[a:a + peer_rows, :payload])
        if quant:
            out.dynamic_scales[own:own + peer_rows].view(torch.uint8).view(peer_rows, 4).copy_(
                recv[a:a + peer_rows, h:h + 4])
        got = recv[a + peer_rows:a + peer_rows + tail].reshape(-1)[:4 * geom.W]
        out.ep_recv_counts[geom.W:2 * geom.W] = got.view(torch.int32)
    out.tp_recv_counts[me] = own
    out.tp_recv_counts[peer] = peer_rows
    return peer_rows


def count_outputs(geom: Geometry, prep: Prepared, out: DispatchOutputs, counts: np.ndarray, total: int) -> None:
    """expert_token_nums (docs/dispatch.md): shared ranks write element 0 only."""
    nums = expert_token_nums(geom, prep.me, counts, total, prep.cfg.expert_token_nums_type)
    out.expert_token_nums.numpy()[:nums.size] = nums
