"""Distributed dispatch on this rank: plan -> EP all-to-all-v -> layout -> TP all-gather-v.

Collectives per call: EP header + EP rows (2), and with tp = 2 TP header + TP rows (2).
Wire row of the EP exchange: payload (H of XT, or int8 with quant 2) | scale fp32 (quant 2)
| meta int32 (source EP rank, token t, slot k, local expert).
"""
from __future__ import annotations

import numpy as np
import torch

from .attrs import Geometry, MoeConfig
from .comm import H_ROWS, Call
from .layout import DispatchOutputs, DispatchShapes, expert_token_nums, recv_layout
from .numerics import dynamic_quant
from .plan import ActiveSet, send_plan
from .wire import Field, Segments, pack, scratch, pack_meta, row_bytes, unpack, unpack_meta


def _quantise_copies(x: torch.Tensor, scales: torch.Tensor | None, token: np.ndarray,
                     smooth_row: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 copies for the rows to send (spec §5): (n, H) int8 and (n,) fp32.

    A copy depends only on (token, smooth row) (only on the token without smooth scales), so
    each distinct pair is quantised once and the results gathered: bit-identical, K times less work."""
    key = token * (scales.shape[0] if scales is not None else 1) + (smooth_row if scales is not None else 0)
    uniq, inverse = np.unique(key, return_inverse=True)
    per = scales.shape[0] if scales is not None else 1
    u_tok = torch.from_numpy(uniq // per)
    smooth = scales[torch.from_numpy(uniq % per)] if scales is not None else None
    q, scale = dynamic_quant(x.index_select(0, u_tok), smooth)
    inv = torch.from_numpy(inverse.reshape(-1))
    return q.index_select(0, inv), scale.index_select(0, inv)


def dispatch(call: Call, geom: Geometry, shapes: DispatchShapes, cfg: MoeConfig, x: torch.Tensor,
             expert_ids: torch.Tensor, scales: torch.Tensor | None, act: ActiveSet) -> DispatchOutputs:
    """Run dispatch for this rank; ``call`` holds its EP (and TP) domain.

    ``geom``: the routing geometry (new id space under elastic scaling); ``shapes``: the eager
    output shapes (from the original attributes).  Wire rows: the token row (H of XT, or H
    int8 + a 4-byte fp32 scale with quant 2), metadata (t, k, local expert) in each segment's
    tail (``wire.Segments``); the source is the segment."""
    dom = call.ep
    me = dom.rank
    quant = cfg.quant_mode == 2
    plan = send_plan(geom, me, expert_ids, act)
    token, slot, local, smooth_row = plan.token, plan.slot, plan.local, plan.smooth_row
    if dom.order is not None:                     # wire order: destinations by group rank
        by_group = np.argsort(dom.order[plan.dest], kind="stable")
        token, slot, local, smooth_row = token[by_group], slot[by_group], local[by_group], smooth_row[by_group]
    width = geom.H + 4 if quant else geom.H * x.element_size()
    sent = Segments(dom.to_group(plan.counts), width)
    hdr = call.exchange_header("EP", plan.counts, width, np.zeros(geom.W, np.int64))
    received = Segments(dom.to_group(hdr[:, H_ROWS]), width)

    send = scratch("send", sent.total, width)
    tok = torch.from_numpy(token)
    if quant:
        q, scale = _quantise_copies(x, scales, token, smooth_row)
        done = 0
        for p in np.flatnonzero(sent.n):          # contiguous segment slices, no scattered writes
            n, s = int(sent.n[p]), int(sent.start[p])
            send[s:s + n, :geom.H].copy_(q[done:done + n].view(torch.uint8))
            send[s:s + n, geom.H:].copy_(scale[done:done + n].view(torch.uint8).view(n, 4))
            done += n
    else:
        rows_out = send.view(x.dtype)             # (total, H): gather x rows straight into each segment
        done = 0
        for p in np.flatnonzero(sent.n):
            n, s = int(sent.n[p]), int(sent.start[p])
            torch.index_select(x, 0, tok[done:done + n], out=rows_out[s:s + n])
            done += n
    sent.write_meta(send, pack_meta(token, slot, local))
    recv = call.exchange_segments("EP", send, sent, received, "rows")

    t, k, loc = unpack_meta(received.read_meta(recv))
    group_to_logical = np.argsort(dom.order) if dom.order is not None else np.arange(dom.size)
    src = np.repeat(group_to_logical, received.n)
    lay = recv_layout(geom, me, src, loc)
    own = int(lay.order.size)
    rows_idx = torch.from_numpy(received.payload_index()[lay.order])
    out = DispatchOutputs.allocate(shapes, geom.H, torch.int8 if quant else x.dtype)
    if quant:
        got = recv.index_select(0, rows_idx)
        out.expand_x[:own] = got[:, :geom.H].view(torch.int8)
        out.dynamic_scales[:own] = got[:, geom.H:].contiguous().view(torch.float32).view(-1)
    else:
        torch.index_select(recv.view(x.dtype), 0, rows_idx, out=out.expand_x[:own])
    tri = np.stack([src, t, k], axis=1)[lay.order]
    out.assist_info_for_combine[:3 * own] = torch.from_numpy(tri.reshape(-1).astype(np.int32))
    blocks = geom.recv_blocks(me)
    out.ep_recv_counts[:blocks] = torch.from_numpy(lay.ep_recv_counts.astype(np.int32))
    total = own
    if geom.tp_active:
        total += _tp_gather(call, geom, out, own, lay.ep_recv_counts, quant)
    nums = expert_token_nums(geom, me, lay.ep_recv_counts, total, cfg.expert_token_nums_type)
    out.expert_token_nums[:nums.size] = torch.from_numpy(nums)        # shared ranks: element 0 only
    return out


def _tp_gather(call: Call, geom: Geometry, out: DispatchOutputs, own: int, own_cum: np.ndarray,
               quant: bool) -> int:
    """TP all-gather-v (spec §6): append the peer's EP rows after ours; returns peer rows.

    The sender's own epRecvCounts (W int32) travel as trailing byte rows of the same
    exchange, so a peer with zero rows still delivers them.
    """
    tp = call.tp
    me, peer = tp.rank, 1 - tp.rank
    fields = [Field(out.expand_x.dtype, geom.H)] + ([Field(torch.float32, 1)] if quant else [])
    width = row_bytes(fields)
    tail = -(-4 * geom.W // width)
    send_counts = np.zeros(2, np.int64)
    send_counts[peer] = own
    hdr = call.exchange_header("TP", send_counts, width, np.zeros(2, np.int64))
    peer_rows = int(hdr[peer, H_ROWS])
    counts_bytes = torch.zeros(tail * width, dtype=torch.uint8)
    counts_bytes[:4 * geom.W] = torch.from_numpy(np.asarray(own_cum, np.int32)).view(torch.uint8)
    parts = [out.expand_x[:own]] + ([out.dynamic_scales[:own]] if quant else [])
    send = torch.cat([pack(parts, fields), counts_bytes.view(tail, width)])
    sc, rc = np.zeros(2, np.int64), np.zeros(2, np.int64)
    sc[peer], rc[peer] = own + tail, peer_rows + tail
    buf = call.exchange_rows("TP", send, sc, rc, "all-gather")
    got = unpack(buf[:peer_rows], fields)
    out.expand_x[own:own + peer_rows] = got[0]
    if quant:
        out.dynamic_scales[own:own + peer_rows] = got[1][:, 0]
    out.ep_recv_counts[geom.W:2 * geom.W] = buf[peer_rows:].reshape(-1)[:4 * geom.W].view(torch.int32)
    out.tp_recv_counts[me] = own
    out.tp_recv_counts[peer] = peer_rows
    return peer_rows
