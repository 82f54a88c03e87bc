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
from .wire import Field, pack, row_bytes, unpack


def _ep_fields(geom: Geometry, quant: bool, xt: torch.dtype) -> list[Field]:
    fields = [Field(torch.int8 if quant else xt, geom.H)]
    if quant:
        fields.append(Field(torch.float32, 1))
    fields.append(Field(torch.int32, 4))
    return fields


def send_rows(geom: Geometry, cfg: MoeConfig, src: int, x: torch.Tensor, expert_ids: torch.Tensor,
              scales: torch.Tensor | None, act: ActiveSet):
    """Plan and payload of this source: (plan, rows (n, H), scale (n,) fp32 or None)."""
    plan = send_plan(geom, src, expert_ids, act)
    rows = x[torch.from_numpy(plan.token)]
    if cfg.quant_mode == 2:
        smooth = scales[torch.from_numpy(plan.smooth_row)] if scales is not None else None
        q, scale = dynamic_quant(rows, smooth)
        return plan, q, scale
    return plan, rows, None


def dispatch(call: Call, geom: Geometry, shapes: DispatchShapes, cfg: MoeConfig, x: torch.Tensor,
             expert_ids: torch.Tensor, scales: torch.Tensor | None, act: ActiveSet) -> DispatchOutputs:
    """Run dispatch for this rank; ``call`` holds its EP (and TP) domain.

    ``geom``: the routing geometry (new id space under elastic scaling); ``shapes``: the eager
    output shapes (from the original attributes)."""
    me = call.ep.rank
    quant = cfg.quant_mode == 2
    plan, rows, scale = send_rows(geom, cfg, me, x, expert_ids, scales, act)
    fields = _ep_fields(geom, quant, x.dtype)
    width = row_bytes(fields)
    meta = np.stack([np.full_like(plan.token, me), plan.token, plan.slot, plan.local], axis=1)
    parts = [rows] + ([scale] if quant else []) + [torch.from_numpy(meta)]
    hdr = call.exchange_header("EP", plan.counts, width, np.zeros(geom.W, np.int64))
    recv_counts = hdr[:, H_ROWS]
    got = unpack(call.exchange_rows("EP", pack(parts, fields), plan.counts, recv_counts, "rows"), fields)
    rmeta = got[-1].to(torch.int64).numpy()
    lay = recv_layout(geom, me, rmeta[:, 0], rmeta[:, 3])
    order = torch.from_numpy(lay.order)
    own = int(order.numel())

    out = DispatchOutputs.allocate(shapes, geom.H, torch.int8 if quant else x.dtype)
    out.expand_x[:own] = got[0][order]
    if quant:
        out.dynamic_scales[:own] = got[1][order, 0]
    out.assist_info_for_combine[:3 * own] = torch.from_numpy(rmeta[lay.order, :3].reshape(-1).astype(np.int32))
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
