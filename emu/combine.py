"""Distributed combine on this rank: TP reduce-scatter -> EP return by triple -> weighted sum.

Collectives per call: (tp = 2) TP header + TP rows, then EP header + EP rows.
Wire row of the EP return: payload (H of XT, or int8 + ceil(H/8) XT group scales with
comm_quant_mode 2) | meta int32 (token t, slot k).  Each source cross-checks, through the
header, the rows every holder sends it against the rows its own dispatch plan sent there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attrs import Geometry, MoeConfig
from .comm import H_EXPECT, H_ROWS, Call
from .errors import TILING_ERROR, AclnnError, PeerError
from .numerics import COMM_QUANT_GROUP, comm_dequant, comm_quant, combine_rows, tp_add
from .plan import ActiveSet, send_plan
from .wire import Field, Segments, pack, scratch, pack_meta, row_bytes, unpack, unpack_meta


@dataclass
class CombineInputs:
    """One rank's combine inputs (shapes as in spec §9.1; optional ones may be None)."""

    expand_x: torch.Tensor                 # (>= A*tp, H) XT
    expert_ids: torch.Tensor               # (Bs, K) int32
    assist_info: torch.Tensor              # (>= 128*A,) int32 triples
    ep_send_counts: torch.Tensor           # dispatch's ep_recv_counts, int32
    expert_scales: torch.Tensor            # (Bs, K) fp32
    tp_send_counts: torch.Tensor | None = None
    x_active_mask: torch.Tensor | None = None
    shared_expert_x: torch.Tensor | None = None
    ori_x: torch.Tensor | None = None
    const_expert_alpha_1: torch.Tensor | None = None
    const_expert_alpha_2: torch.Tensor | None = None
    const_expert_v: torch.Tensor | None = None


def own_rows(geom: Geometry, rank: int, inp: CombineInputs) -> int:
    """Rows this rank received in dispatch: ``ep_send_counts[W*L_r - 1]`` (spec §9.1)."""
    return int(inp.ep_send_counts[geom.recv_blocks(rank) - 1])


def check_own_rows(geom: Geometry, rank: int, inp: CombineInputs, own: int, cap: int,
                   positional: bool = False) -> None:
    """Data checks on what this rank is asked to return (561002 instead of garbage).

    ``geom``: routing geometry; ``cap``: A of this rank's eager shapes."""
    if not 0 <= own <= cap:
        raise AclnnError(TILING_ERROR, f"combine: ep_send_counts[{geom.recv_blocks(rank) - 1}]={own} on EP rank "
                         f"{rank} must be in [0, A={cap}]")
    if positional:
        return
    tri = inp.assist_info[:3 * own].to(torch.int64).view(own, 3)
    bad = (tri[:, 0] < 0) | (tri[:, 0] >= geom.W) | (tri[:, 1] < 0) | (tri[:, 2] < 0) \
        | (tri[:, 2] >= geom.K + geom.Ns)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AclnnError(TILING_ERROR, f"combine: assist_info_for_combine[{3 * i}:{3 * i + 3}]="
                         f"{tri[i].tolist()} on EP rank {rank} is not a dispatch triple")


def combine(call: Call, geom: Geometry, cfg: MoeConfig, inp: CombineInputs, act: ActiveSet,
            positional: bool = False) -> torch.Tensor:
    """Run combine for this rank; returns x_out (Bs, H) XT (inactive tokens zero).

    ``geom``: routing geometry (new id space under elastic scaling); the special-expert
    ranges of the weighted sum use the ORIGINAL ``cfg.moe_expert_num`` (spec §7, §9.3).
    Wire rows: the expert output row (H of XT, or H int8 + ceil(H/8) XT group scales with
    comm_quant_mode 2), metadata (t, k) in each segment's tail (``wire.Segments``).
    ``positional`` (V1, no triples): a holder finds each row's source from ep_send_counts and
    the source matches the rows to its own send plan by position (same order both sides)."""
    dom = call.ep
    me = dom.rank
    xt = inp.expand_x.dtype
    own = own_rows(geom, me, inp)
    y = inp.expand_x[:own]
    if geom.tp_active:
        y = _tp_reduce(call, geom, inp, own)
    if positional:
        blocks = geom.recv_blocks(me)
        sizes = np.diff(inp.ep_send_counts[:blocks].to(torch.int64).numpy(), prepend=0)
        src = np.repeat(np.arange(blocks) % geom.W, sizes)[:own]
        tri = np.stack([src, np.zeros_like(src), np.zeros_like(src)], axis=1)
    else:
        tri = inp.assist_info[:3 * own].to(torch.int64).view(own, 3).numpy()
    dest = tri[:, 0] if dom.order is None else dom.order[tri[:, 0]]
    order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(tri[:, 0], minlength=geom.W).astype(np.int64)
    plan = send_plan(geom, me, inp.expert_ids, act)
    expected = plan.counts
    quant = cfg.comm_quant_mode == 2
    groups = -(-geom.H // COMM_QUANT_GROUP)
    width = geom.H + groups * inp.expand_x.element_size() if quant else geom.H * inp.expand_x.element_size()
    sent = Segments(dom.to_group(send_counts), width)
    hdr = call.exchange_header("EP", send_counts, width, expected)
    received = Segments(dom.to_group(hdr[:, H_ROWS]), width)

    send = scratch("send", sent.total, width)
    order_t = torch.from_numpy(order)
    if quant:
        q, scale = comm_quant(y.index_select(0, order_t))
        pos = torch.from_numpy(sent.payload_index())
        send[pos, :geom.H] = q.view(torch.uint8)
        send[pos, geom.H:] = scale.contiguous().view(torch.uint8)
    else:
        rows_out = send.view(xt)
        done = 0
        for p in np.flatnonzero(sent.n):
            n, s = int(sent.n[p]), int(sent.start[p])
            torch.index_select(y, 0, order_t[done:done + n], out=rows_out[s:s + n])
            done += n
    sent.write_meta(send, pack_meta(tri[order, 1], tri[order, 2], np.zeros(own, np.int64)))
    recv = call.exchange_segments("EP", send, sent, received, "rows")
    _cross_check(call, hdr, send_counts, expected)

    if positional:                                   # the plan's rows, peers in group order
        by_group = np.argsort(plan.dest if dom.order is None else dom.order[plan.dest], kind="stable")
        t, k = plan.token[by_group], plan.slot[by_group]
    else:
        t, k, _ = unpack_meta(received.read_meta(recv))
    bs, k_num = inp.expert_ids.shape
    if t.size and (int(t.max()) >= bs or int(k.max()) >= k_num + geom.Ns):
        raise PeerError(TILING_ERROR, f"combine call #{call.call_no} on EP rank {me}: a peer returned a row for "
                        f"(token, slot) outside (Bs={bs}, K+N_s={k_num + geom.Ns}); its assist_info is not from "
                        f"this dispatch")
    rows_idx = torch.from_numpy(received.payload_index())
    if quant:
        got = recv.index_select(0, rows_idx)
        rows = comm_dequant(got[:, :geom.H].view(torch.int8), got[:, geom.H:].contiguous().view(xt), xt)
        rows_idx = None
    else:                                            # payload rows straight from the wire buffer
        rows = recv.view(xt)
    acc = combine_rows(rows, torch.from_numpy(t), torch.from_numpy(k), inp.expert_ids, inp.expert_scales,
                       None if act.slot_mask is None else torch.from_numpy(act.slot_mask), geom.Ns,
                       cfg.moe_expert_num, geom.zero, geom.copy, geom.const, inp.ori_x,
                       inp.const_expert_alpha_1, inp.const_expert_alpha_2, inp.const_expert_v,
                       inp.shared_expert_x, row_index=rows_idx)
    x_out = acc.to(xt)
    x_out[torch.from_numpy(~act.tokens)] = 0
    return x_out


def _cross_check(call: Call, hdr: np.ndarray, send_counts: np.ndarray, expected: np.ndarray) -> None:
    got, want = hdr[:, H_ROWS], expected
    ranks = call.ep.ranks
    if not np.array_equal(got, want) or not np.array_equal(hdr[:, H_EXPECT], send_counts):
        bad = sorted(set(np.flatnonzero(got != want)) | set(np.flatnonzero(hdr[:, H_EXPECT] != send_counts)))
        desc = "; ".join(f"rank {ranks[i]} returns {int(got[i])} rows, this rank's dispatch sent it "
                         f"{int(want[i])}; it expects {int(hdr[i, H_EXPECT])}, this rank holds "
                         f"{int(send_counts[i])} for it" for i in bad)
        raise PeerError(TILING_ERROR, f"combine call #{call.call_no} on EP rank {call.ep.rank}: the inputs do "
                        f"not match the dispatch they claim to come from: {desc}")


def _tp_reduce(call: Call, geom: Geometry, inp: CombineInputs, own: int) -> torch.Tensor:
    """TP reduce-scatter (spec §9.2.1): own rows + the peer's partials for them, in XT."""
    tp = call.tp
    peer = 1 - tp.rank
    peer_count = int(inp.tp_send_counts[peer])
    fields = [Field(inp.expand_x.dtype, geom.H)]
    sc, expect = np.zeros(2, np.int64), np.zeros(2, np.int64)
    sc[peer], expect[peer] = peer_count, own
    hdr = call.exchange_header("TP", sc, row_bytes(fields), expect)
    if int(hdr[peer, H_ROWS]) != own or int(hdr[peer, H_EXPECT]) != peer_count:
        rc = hdr[:, H_ROWS]
        call.exchange_rows("TP", pack([inp.expand_x[own:own + peer_count]], fields), sc, rc, "reduce-scatter")
        call.abort(PeerError(TILING_ERROR, f"combine call #{call.call_no}: TP rank {tp.rank} holds {own} own rows and "
                        f"{peer_count} for its peer, but TP rank {peer} sends {int(hdr[peer, H_ROWS])} and "
                        f"expects {int(hdr[peer, H_EXPECT])}"))
    buf = call.exchange_rows("TP", pack([inp.expand_x[own:own + peer_count]], fields), sc, hdr[:, H_ROWS],
                            "reduce-scatter")
    partial = unpack(buf, fields)[0]
    return tp_add(inp.expand_x[:own], partial)
