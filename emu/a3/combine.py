"""Atlas A3 combine on this rank, phase by phase (docs/combine.md).

Phases:

    TP reduce-scatter  (tp 2) own rows + the TP peer's partials for them, in XT (added as
                       they are packed for the exchange when they travel inline)
    route back         each row's source: from its triple (V2), or by position (V1)
    exchange           EP header (rows per source, the rows this rank expects back: each
                       source cross-checks them against its own dispatch plan) with the
                       packed rows (expert rows, or int8 + XT group scales with
                       comm_quant_mode 2; metadata tails (t, k)) in each peer's slot when
                       they fit, else a second, uneven all-to-all
    weighted sum       the fp32 k-order sum with shared and special experts, rounded to XT
                       (combine_add_rms_norm: + residual_x, RMSNorm * gamma)

Collectives per call: (tp = 2) the TP header with the rows, then the EP header with the rows
(1 each; 2 on a group's first combine, when some rank's rows exceed the slot, or when large rows
go bare, straight from expand_x: on TP, and on EP at tp 1 with one expert per rank and no comm
quant).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..comm.call import BareRows, Call, Outbound, SlotNeed
from ..comm.domain import Domain
from ..comm.header import Header
from ..comm.wire import Segments, pack_meta, unpack_meta
from ..core.attrs import Geometry
from ..core.errors import TILING_ERROR, ErrorKind, PeerError
from ..core.inputs import CombineInputs
from ..core.numerics import (COMM_QUANT_GROUP, ReceivedRows, comm_dequant, comm_quant, combine_output, combine_rows,
                             tp_add)
from ..core.plan import ActiveSet, SendPlan, send_plan, send_counts as plan_counts
from .dispatch import slot_need, xt_width
from ..core.request import Prepared
from .checks import own_rows
from . import native


def combine(call: Call, prep: Prepared, inp: CombineInputs) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run combine for this rank; returns x_out (Bs, H) XT (inactive tokens zero), or with
    ``inp.norm`` combine_add_rms_norm's (y, rstd, x).

    The special-expert ranges of the weighted sum use the ORIGINAL ``moe_expert_num`` (docs/elastic.md,
    docs/combine.md).  ``inp.positional`` (V1, no triples): a holder finds each row's source from
    ep_send_counts and the source matches the rows to its own send plan by position (same
    order both sides)."""
    geom = prep.route
    own = own_rows(geom, prep.me, inp.ep_send_counts)
    y = tp_reduce_scatter(call, geom, inp, own) if geom.tp_active else inp.expand_x[:own]
    tri = route_back(geom, prep.me, inp, own)
    plan = send_plan(geom, prep.me, inp.expert_ids, prep.act) if inp.positional else None
    expected = plan.counts if plan is not None else plan_counts(geom, prep.me, inp.expert_ids, prep.act)
    return return_rows(call, prep, inp, Returning(y, tri, plan, expected, prep.act))


@dataclass(frozen=True)
class TpSum:
    """The TP reduce's terms (tp 2): this rank's own rows ``mine`` and the TP peer's partials
    for them ``theirs`` (a view of the TP exchange's wire buffer), added where they are packed
    (:func:`pack_rows`) or by :meth:`rows`."""

    mine: torch.Tensor
    theirs: torch.Tensor

    def rows(self) -> torch.Tensor:
        """The reduced rows in XT (``numerics.tp_add``)."""
        got = native.tp_add(self.mine, self.theirs)
        return got if got is not None else tp_add(self.mine, self.theirs)


@dataclass(frozen=True)
class Returning:
    """What combine sends back and expects: the rows ``y`` (own, after TP: with tp 2 the terms
    of their sum), each one's (source, t, k) ``tri``, this rank's dispatch ``plan`` (V1 only),
    the rows each holder must return (``expected``) and the active tokens and slots."""

    y: torch.Tensor | TpSum
    tri: np.ndarray
    plan: SendPlan | None
    expected: np.ndarray
    act: ActiveSet


def return_rows(call: Call, prep: Prepared, inp: CombineInputs,
                back: Returning) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Every phase after routing back: exchange the rows, cross-check the counts, then the
    weighted sum."""
    y, tri, plan, expected, act = back.y, back.tri, back.plan, back.expected, back.act
    geom = prep.route
    quant = prep.cfg.comm_quant_mode == 2
    send_counts = np.bincount(tri[:, 0], minlength=geom.W).astype(np.int64)
    width = _width(inp.expand_x, geom.H, quant)
    can_bare = not quant and geom.L == 1 and not geom.tp_active      # (tp 2: its rows are a sum, made anyway)
    if isinstance(y, TpSum) and (quant or not call.packs_first("EP", send_counts, width)):
        y = y.rows()                          # its terms' wire buffer is gone by the time they are packed
    bare = bare_rows(call, y, tri) if can_bare else None
    hdr, recv, received = call.exchange(
        "EP", Outbound(send_counts, width, expected, lambda seg, buf: pack_rows(call.ep, y, tri, seg, quant, buf),
                       bare),
        slot_need(geom, 0 if bare is None else geom.H * inp.expand_x.element_size()))
    _cross_check(call, hdr, send_counts, expected)
    x_out = _native_out(prep, inp, recv, received, act)
    if x_out is not None:
        return x_out
    acc = _native_sum(prep, inp, recv, received)
    if acc is None:
        got = unpack_rows(call, prep, inp, plan, recv, received)
        acc = combine_rows(got, inp, None if act.slot_mask is None else torch.from_numpy(act.slot_mask), geom.Ns)
    return combine_output(acc, inp, act.tokens)


def _native_takes(prep: Prepared, inp: CombineInputs) -> bool:
    """The native weighted sum covers this call: V2 rows (not V1's positions), no comm quant, no
    copy or const experts."""
    sp = inp.special
    return not (inp.positional or prep.cfg.comm_quant_mode == 2 or ((sp.copy or sp.const) and sp.ori_x is not None))


def _native_out(prep: Prepared, inp: CombineInputs, recv: torch.Tensor, received: Segments,
                act: ActiveSet) -> torch.Tensor | None:
    """x_out by the native accelerator for bf16 rows without the add-RMSNorm tail
    (:func:`native.combine_out`: the sum of :func:`_native_sum`, rounded a token at a time);
    None: not taken."""
    shared = inp.shared_expert_x
    if inp.norm is not None or inp.expand_x.dtype != torch.bfloat16 or not _native_takes(prep, inp):
        return None
    bs, k_num = inp.expert_ids.shape
    if shared is not None:
        if shared.dtype != torch.bfloat16 or shared.numel() != bs * prep.route.H:
            return None
        shared = shared.reshape(bs, -1).contiguous()
    out = torch.empty(bs, prep.route.H, dtype=torch.bfloat16)
    w = inp.expert_scales.to(torch.float32).contiguous()
    active = None if act.tokens.all() else act.tokens
    if not native.combine_out(recv, received, w, k_num + prep.route.Ns, shared, active, out):
        return None
    return out


def _native_sum(prep: Prepared, inp: CombineInputs, recv: torch.Tensor, received: Segments) -> torch.Tensor | None:
    """:func:`combine_rows` by the native accelerator (None: not taken; V1, comm quant, copy
    or const experts, or a row whose (token, slot) is out of range, which unpack_rows reports)."""
    if not _native_takes(prep, inp):
        return None
    bs, k_num = inp.expert_ids.shape
    acc = torch.zeros(bs, prep.route.H, dtype=torch.float32)
    w = inp.expert_scales.to(torch.float32).contiguous()
    if not native.combine_sum(recv, received, inp.expand_x.dtype, w,
                              k_num + prep.route.Ns, acc):
        return None
    if inp.shared_expert_x is not None:
        acc.add_(inp.shared_expert_x.reshape(bs, -1).to(torch.float32))
    return acc


def _width(expand_x: torch.Tensor, h: int, quant: bool) -> int:
    """Bytes of one wire row: H of XT (``xt_width``), or H int8 + ceil(H/8) XT group scales."""
    groups = -(-h // COMM_QUANT_GROUP)
    return h + groups * expand_x.element_size() if quant else xt_width(h, expand_x.element_size())


def route_back(geom: Geometry, me: int, inp: CombineInputs, own: int) -> np.ndarray:
    """(own, 3) int64 (source, t, k) of every row this rank holds: its dispatch triples, or for
    V1 (positional) the source from the block it lies in (t and k unknown, 0)."""
    if not inp.positional:
        return inp.assist_info[:3 * own].to(torch.int64).view(own, 3).numpy()
    blocks = geom.recv_blocks(me)
    sizes = np.diff(inp.ep_send_counts[:blocks].to(torch.int64).numpy(), prepend=0)
    src = np.repeat(np.arange(blocks) % geom.W, sizes)[:own]
    return np.stack([src, np.zeros_like(src), np.zeros_like(src)], axis=1)


def pack_rows(dom: Domain, y: torch.Tensor | TpSum, tri: np.ndarray, sent: Segments, quant: bool,
              send: torch.Tensor) -> None:
    """Fill the (sent.total, width) uint8 ``send`` buffer: rows ordered by destination, each
    peer's rows in its segment, then the segment's metadata tail (t, k); the terms of a TP sum
    added as they are packed (not with ``quant``)."""
    dest = tri[:, 0] if dom.order is None else dom.order[tri[:, 0]]
    order = np.argsort(dest, kind="stable")
    meta = (tri[order, 1], tri[order, 2], np.zeros(len(order), np.int64))
    if isinstance(y, TpSum):
        if native.pack_tp_add(send, sent, (y.mine, y.theirs), order, meta):
            return
        y = y.rows()
    h = y.shape[1]
    if quant:
        q, scale = comm_quant(y.index_select(0, torch.from_numpy(order)))
        pos = torch.from_numpy(sent.payload_index())
        send[pos, :h] = q.view(torch.uint8)
        send[pos, h:] = scale.contiguous().view(torch.uint8)
    elif native.pack_rows(send, sent.width, sent.start, sent.n, y, order, None, meta):
        return
    else:
        sent.gather((y,), order, (send.view(y.dtype)[:, :h],))
    sent.write_meta(send, pack_meta(*meta))


def bare_rows(call: Call, y: torch.Tensor, tri: np.ndarray) -> BareRows:
    """Combine's rows bare (no comm quant, one local expert, tp 1): sent straight from ``y``
    when its rows are already ordered by destination (one block per source, sources in group
    order), else gathered so; received into a buffer the weighted sum reads."""
    row_bytes = y.shape[1] * y.element_size()

    @functools.cache
    def order() -> np.ndarray | None:
        """The rows in destination order (None: they are)."""
        dest = tri[:, 0] if call.ep.order is None else call.ep.order[tri[:, 0]]
        return None if bool((dest[1:] >= dest[:-1]).all()) else np.argsort(dest, kind="stable")

    def rows() -> torch.Tensor:
        if order() is None and y.is_contiguous():
            return y
        index = order() if order() is not None else np.arange(y.shape[0])
        buf = call.ctx.scratch("send", y.shape[0], row_bytes).view(y.dtype)
        torch.index_select(y, 0, torch.from_numpy(index), out=buf)
        return buf

    def words() -> np.ndarray:
        got = tri if order() is None else tri[order()]
        return pack_meta(got[:, 1], got[:, 2], np.zeros(len(got), np.int64))

    return BareRows(rows, words, lambda m: call.ctx.scratch("rows", m, row_bytes).view(y.dtype))


def unpack_rows(call: Call, prep: Prepared, inp: CombineInputs, plan: SendPlan | None, recv: torch.Tensor,
                received: Segments) -> ReceivedRows:
    """The received rows with their (token, slot): from the metadata tails, or for V1 from
    this rank's own ``plan`` (peers in group order; None for V2); int8 rows dequantised."""
    dom, geom = call.ep, prep.route
    if inp.positional:
        by_group = np.argsort(plan.dest if dom.order is None else dom.order[plan.dest], kind="stable")
        t, k = plan.token[by_group], plan.slot[by_group]
    else:
        t, k, _ = unpack_meta(received.read_meta(recv))
    bs, k_num = inp.expert_ids.shape
    if t.size and (int(t.max()) >= bs or int(k.max()) >= k_num + geom.Ns):
        raise PeerError(TILING_ERROR, f"combine call #{call.call_no} on EP rank {prep.me}: a peer returned a row for "
                        f"(token, slot) outside (Bs={bs}, K+N_s={k_num + geom.Ns}); its assist_info is not from "
                        f"this dispatch", kind=ErrorKind.MISMATCHED_DATA)
    rows_idx = received.payload_index()
    xt, h = inp.expand_x.dtype, geom.H
    if prep.cfg.comm_quant_mode == 2:
        got = recv.index_select(0, torch.from_numpy(rows_idx))
        rows = comm_dequant(got[:, :h].view(torch.int8), got[:, h:].contiguous().view(xt), xt)
        return ReceivedRows(rows, t, k)
    return ReceivedRows(recv.view(xt)[:, :h], t, k, index=rows_idx)


def _cross_check(call: Call, hdr: Header, send_counts: np.ndarray, expected: np.ndarray) -> None:
    """Every holder returns what this rank's dispatch sent it, and expects what this rank holds."""
    got = hdr.rows
    ranks = call.ep.ranks
    if not np.array_equal(got, expected) or not np.array_equal(hdr.expect, send_counts):
        bad = sorted(set(np.flatnonzero(got != expected)) | set(np.flatnonzero(hdr.expect != send_counts)))
        desc = "; ".join(f"rank {ranks[i]} returns {int(got[i])} rows, this rank's dispatch sent it "
                         f"{int(expected[i])}; it expects {int(hdr.expect[i])}, this rank holds "
                         f"{int(send_counts[i])} for it" for i in bad)
        raise PeerError(TILING_ERROR, f"combine call #{call.call_no} on EP rank {call.ep.rank}: the inputs do "
                        f"not match the dispatch they claim to come from: {desc}", kind=ErrorKind.MISMATCHED_DATA,
                        culprits=tuple(ranks[i] for i in bad))


def tp_reduce_scatter(call: Call, geom: Geometry, inp: CombineInputs, own: int) -> TpSum:
    """TP reduce-scatter (docs/combine.md): own rows and the peer's partials for them, whose sum
    in XT combine sends back (:class:`TpSum`).

    One exchange on the TP group carries the header (the rows this rank sends the peer and the
    rows it expects back, cross-checked) and, once the group has a slot, the rows; or, when they
    are large, a second one moves them bare, straight from expand_x."""
    tp = call.tp
    peer = 1 - tp.rank
    at = peer if tp.order is None else int(tp.order[peer])          # the peer's segment (group order)
    peer_count = int(inp.tp_send_counts[peer])
    xt = inp.expand_x.dtype
    h = geom.H
    width = xt_width(h, inp.expand_x.element_size())
    sc, expect = np.zeros(2, np.int64), np.zeros(2, np.int64)
    sc[peer], expect[peer] = peer_count, own
    part = inp.expand_x[own:own + peer_count]

    def fill(seg: Segments, buf: torch.Tensor) -> None:
        a = int(seg.start[at])
        buf[a:a + part.shape[0]].view(xt)[:, :h].copy_(part)

    bare = BareRows(part.contiguous, lambda: np.zeros(0, np.int32),
                    lambda m: call.ctx.scratch("tp_rows", m, h * part.element_size()).view(xt),
                    lambda rows: np.zeros(2, np.int64))        # the peer's partials, straight from expand_x
    most = max(geom.a_moe, geom.a_shared)                     # the same on both TP ranks
    hdr, recv, received = call.exchange("TP", Outbound(sc, width, expect, fill, bare),
                                        SlotNeed(most, most, h * part.element_size()), "reduce-scatter")
    if int(hdr.rows[peer]) != own or int(hdr.expect[peer]) != peer_count:
        call.abort(PeerError(TILING_ERROR, f"combine call #{call.call_no}: TP rank {tp.rank} holds {own} own rows and "
                             f"{peer_count} for its peer, but TP rank {peer} sends {int(hdr.rows[peer])} and "
                             f"expects {int(hdr.expect[peer])}", kind=ErrorKind.MISMATCHED_DATA,
                             culprits=(tp.ranks[peer],)))
    a = int(received.start[at])
    return TpSum(inp.expand_x[:own], recv[a:a + own].view(xt)[:, :h])
