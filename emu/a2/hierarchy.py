"""Atlas A2 hierarchy path (docs/atlas-a2.md) with its real two-level communication.

A server is 8 consecutive EP ranks; rank p = 8*s + i.  Domains: "EP" (the whole group, for
the header: call checks, errors and the step-1 counts), "INTER" (the ranks with local index
i, one per server) and "INTRA" (the 8 ranks of the server), both made by their members alone.

dispatch: each token is quantised once (no smoothing), then
  1. INTER: p sends, to rank (d, i) of every server d its token hits, the token's struct
     (row, scale, ids, weights, t), tokens in increasing t;
  2. INTRA: relay (d, i) copies each struct once per hit on its server to the expert's rank;
  the expert rank lays the rows out in blocks (l, p), increasing t (the A3/fullmesh layout), with
  expand_scales[row] = expert_scales_p[t, k]; the epRecvCounts tail gets the pre-reduction
  tables of docs/atlas-a2.md (relay: innerCnt / innerOff per source server; source: outerCnt / outerOff),
  their padding zero.
combine:
  1. INTER: p sends, to rank (d, i), the ids of its tokens that hit server d (the relay's routing
     table; the hardware keeps it in the epRecvCounts tail);
  2. INTRA: each expert rank returns its rows, with their expand_scales weight, to the relay of
     the row's source;
  3. the relay forms, per token, P_d = XT(fp32(y_k0) * w_k0 [+ fp32(y_k) * w_k ...]) over the
     token's hits on its server in k order (each multiply and add rounded separately, docs/atlas-a2.md);
  4. INTER: P_d goes back to p, which adds them in increasing server order: out = XT(0 + P_0 + ...).
The mask is ignored (every token flows, every x_out row is written), as on the hardware.
"""
from __future__ import annotations

import numpy as np
import torch

from ..comm.call import Call
from ..comm.domain import Domain
from ..comm.wire import Field, pack, row_bytes, unpack
from ..core.inputs import CombineInputs, DispatchInputs
from ..core.layout import DispatchOutputs, expert_token_nums, recv_layout
from ..core.numerics import F32, dynamic_quant
from ..core.request import Prepared


def server_domains(call: Call) -> None:
    """Add the INTER (same local index) and INTRA (same server) domains of this rank."""
    ep = call.ep
    s, i = divmod(ep.rank, 8)
    call.add_domain(Domain.subset("INTER", ep, list(range(i, ep.size, 8))))
    call.add_domain(Domain.subset("INTRA", ep, list(range(8 * s, 8 * s + 8))))


def _servers_hit(ids: np.ndarray, L: int, n_servers: int) -> np.ndarray:
    """(Bs, N) bool: token t has an expert on server d."""
    hit = np.zeros((ids.shape[0], n_servers), bool)
    hit[np.arange(ids.shape[0])[:, None], (ids // L) // 8] = True
    return hit


def _server_counts(call: Call, ids: np.ndarray, L: int, n_srv: int):
    """The EP header of a hierarchy call, carrying step 1's counts: to relay (d, i), the number
    of this rank's tokens that hit server d.  Returns (tokens per server d, those counts, the
    counts each source p = 8*s + i of this relay's INTER group announced to it)."""
    W, i = call.ep.size, call.ep.rank % 8
    hit = _servers_hit(ids, L, n_srv)
    per_server = [np.flatnonzero(hit[:, d]) for d in range(n_srv)]
    counts = np.array([len(t) for t in per_server], np.int64)
    ep_rows = np.zeros(W, np.int64)
    ep_rows[8 * np.arange(n_srv) + i] = counts
    hdr = call.exchange_header("EP", ep_rows, 0, np.zeros(W, np.int64))
    return per_server, counts, hdr.rows[8 * np.arange(n_srv) + i]


def dispatch(call: Call, prep: Prepared, inp: DispatchInputs) -> DispatchOutputs:
    """Hierarchy dispatch (mask ignored, two hops): the fullmesh layout, expand_scales and the
    epRecvCounts tail tables."""
    server_domains(call)
    geom, shapes, cfg = prep.route, prep.shapes, prep.cfg
    x, expert_ids, expert_scales = inp.x, inp.expert_ids, inp.expert_scales
    W, L, K, H = geom.W, geom.L, geom.K, geom.H
    me = call.ep.rank
    s, i = divmod(me, 8)
    n_srv = W // 8
    ids = expert_ids.numpy().astype(np.int64)
    bs = ids.shape[0]
    quant = cfg.quant_mode == 2
    if quant:
        payload, scale = dynamic_quant(x, None)          # once per token, no smoothing (docs/atlas-a2.md)
    else:
        payload, scale = x, torch.zeros(bs, dtype=F32)
    per_server, counts, incoming = _server_counts(call, ids, L, n_srv)

    # step 1: one struct per (token, server it hits) to the relay of that server
    f1 = [Field(payload.dtype, H), Field(F32, 1), Field(torch.int32, K), Field(F32, K), Field(torch.int32, 1)]
    tok = torch.from_numpy(np.concatenate(per_server) if per_server else np.zeros(0, np.int64))
    parts = [payload[tok], scale[tok], expert_ids[tok], expert_scales.to(F32)[tok], tok.to(torch.int32)]
    got = unpack(call.exchange_rows("INTER", pack(parts, f1), counts, incoming, "inter-server rows"), f1)
    r_payload, r_scale, r_ids, r_w, r_t = got
    r_src = np.repeat(8 * np.arange(n_srv) + i, incoming)          # source p of each struct

    # step 2: the relay copies each struct once per hit on its own server to the expert's rank
    rid = r_ids.numpy().astype(np.int64)
    jj, kk = np.nonzero((rid // L) // 8 == s)
    e = rid[jj, kk]
    dest, loc = (e // L) % 8, e % L
    t_of = r_t.numpy().reshape(-1).astype(np.int64)
    order = np.lexsort((t_of[jj], r_src[jj], loc, dest))
    jj, kk, dest, loc = jj[order], kk[order], dest[order], loc[order]
    send_counts = np.bincount(dest, minlength=8).astype(np.int64)
    f2 = [Field(payload.dtype, H), Field(F32, 1), Field(F32, 1), Field(torch.int32, 4)]
    jt = torch.from_numpy(jj)
    meta = torch.from_numpy(np.stack([r_src[jj], t_of[jj], kk, loc], axis=1).astype(np.int32))
    parts = [r_payload[jt], r_scale[jt], r_w[jt, torch.from_numpy(kk)], meta]
    hdr2 = call.exchange_header("INTRA", send_counts, row_bytes(f2), np.zeros(8, np.int64))
    got = unpack(call.exchange_rows("INTRA", pack(parts, f2), send_counts, hdr2.rows, "intra-server rows"), f2)
    rows, rscale, rw, rmeta = got
    m = rmeta.numpy().astype(np.int64)
    lay = recv_layout(geom, me, m[:, 0], m[:, 3])
    own = int(lay.order.size)
    idx = torch.from_numpy(lay.order)
    out = DispatchOutputs.allocate(shapes, H, payload.dtype)
    out.expand_x[:own] = rows[idx]
    if quant:
        out.dynamic_scales[:own] = rscale[idx, 0]
    out.expand_scales[:own] = rw[idx, 0]
    E = W * L
    tail = out.ep_recv_counts                                       # allocated with the tail (expert_scales given)
    tail[:E] = torch.from_numpy(lay.ep_recv_counts.astype(np.int32))
    inner = {}
    for s_src in range(n_srv):                                      # per source server (p = 8*s_src + i)
        mine = np.flatnonzero(r_src == 8 * s_src + i)
        inner[s_src] = inner_tables(rid[mine], t_of[mine], s, L, W, geom.G, K)
    write_tail(tail, E, geom.G, K, n_srv, inner, outer_tables(ids, L, n_srv))
    nums = expert_token_nums(geom, me, lay.ep_recv_counts, own, cfg.expert_token_nums_type)
    out.expert_token_nums[:nums.size] = torch.from_numpy(nums)
    return out


def combine(call: Call, prep: Prepared, inp: CombineInputs) -> torch.Tensor:
    """Hierarchy combine: per-server partial sums at the relays, added at the source in
    server order (every token; the mask is ignored)."""
    server_domains(call)
    geom = prep.route
    expand_x, expert_ids, ep_send_counts, expand_scales = inp.expand_x, inp.expert_ids, inp.ep_send_counts, \
        inp.expand_scales
    W, L, K, H = geom.W, geom.L, geom.K, geom.H
    me = call.ep.rank
    s, i = divmod(me, 8)
    n_srv = W // 8
    xt = expand_x.dtype
    ids = expert_ids.numpy().astype(np.int64)
    bs = ids.shape[0]
    per_server, counts, incoming = _server_counts(call, ids, L, n_srv)

    # 1: the relay learns the routing of the tokens it reduces
    f1 = [Field(torch.int32, K), Field(torch.int32, 1)]
    tok = torch.from_numpy(np.concatenate(per_server) if per_server else np.zeros(0, np.int64))
    got = unpack(call.exchange_rows("INTER", pack([expert_ids[tok], tok.to(torch.int32)], f1), counts, incoming,
                                    "inter-server ids"), f1)
    q_ids = got[0].numpy().astype(np.int64)
    q_t = got[1].numpy().reshape(-1).astype(np.int64)
    q_src = np.repeat(8 * np.arange(n_srv) + i, incoming)

    # 2: every expert row goes back, with its weight, to the relay of its source
    E = W * L
    own = int(ep_send_counts[E - 1])
    sizes = np.diff(ep_send_counts[:E].to(torch.int64).numpy(), prepend=0)
    block = np.repeat(np.arange(E), sizes)[:own]
    src, loc = block % W, block // W
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    within = np.arange(own) - first[block]
    order = np.argsort(src % 8, kind="stable")
    send_counts = np.bincount(src % 8, minlength=8).astype(np.int64)
    f2 = [Field(xt, H), Field(F32, 1), Field(torch.int32, 3)]
    meta = torch.from_numpy(np.stack([src, loc, within], axis=1)[order].astype(np.int32))
    ot = torch.from_numpy(order)
    parts = [expand_x[:own][ot], expand_scales.to(F32)[:own][ot], meta]
    # what this relay expects from each expert rank of its server: one row per hit
    qj, qk = np.nonzero((q_ids // L) // 8 == s)
    expect = np.bincount((q_ids[qj, qk] // L) % 8, minlength=8).astype(np.int64)
    hdr2 = call.exchange_header("INTRA", send_counts, row_bytes(f2), expect)
    got = unpack(call.exchange_rows("INTRA", pack(parts, f2), send_counts, hdr2.rows, "intra-server rows"), f2)
    rows, rw, rmeta = got
    rm = rmeta.numpy().astype(np.int64)
    sender = np.repeat(8 * s + np.arange(8), hdr2.rows)           # expert rank of each row
    expert = sender * L + rm[:, 1]
    # row -> (token, k): the `within`-th token of source p (increasing t) that chose this expert
    # every hit the relay knows (token j of the table, slot k), keyed (source, expert, rank by t)
    hj, hk = np.nonzero((q_ids // L) // 8 == s)
    he = q_ids[hj, hk]
    by = np.lexsort((q_t[hj], he, q_src[hj]))
    grp = q_src[hj][by] * (W * L) + he[by]
    within_hit = np.arange(by.size) - np.searchsorted(grp, grp)
    table_key = grp * (geom.G + 1) + within_hit                          # sorted ascending
    row_key = (rm[:, 0] * (W * L) + expert) * (geom.G + 1) + rm[:, 2]
    found = by[np.searchsorted(table_key, row_key)]
    tk = np.stack([q_t[hj][found], hk[found], hj[found]], axis=1).astype(np.int64).reshape(-1, 3)
    # 3: partial sums per token over this server's hits, in k order, rounded to XT
    term = rows.to(F32) * rw                                            # fp32(y) * w, one rounding
    n_tok = len(q_t)
    acc = torch.zeros(n_tok, H, dtype=F32)
    order = np.lexsort((tk[:, 1], tk[:, 2])) if tk.size else np.zeros(0, np.int64)
    slot = tk[order, 2]
    rank_in_tok = np.arange(order.size) - np.searchsorted(slot, slot)
    for r in range(int(rank_in_tok.max()) + 1 if order.size else 0):
        sel = order[rank_in_tok == r]
        j = torch.from_numpy(tk[sel, 2])
        t_sel = term[torch.from_numpy(sel)]
        if r == 0:
            acc[j] = t_sel                                               # Muls: the first hit
        else:
            acc[j] = acc[j] + t_sel                                      # then one rounded add per hit
    partial = acc.to(xt)
    # 4: partials back to the sources, added in increasing server order
    f3 = [Field(xt, H), Field(torch.int32, 1)]
    back_counts = np.bincount(q_src // 8, minlength=n_srv).astype(np.int64)
    got = unpack(call.exchange_rows("INTER", pack([partial, torch.from_numpy(q_t.astype(np.int32))], f3),
                                    back_counts, counts, "inter-server partials"), f3)
    p_rows, p_t = got
    from_server = np.repeat(np.arange(n_srv), counts)
    out = torch.zeros(bs, H, dtype=F32)
    pt = p_t.numpy().reshape(-1).astype(np.int64)
    for d in range(n_srv):
        sel = np.flatnonzero(from_server == d)
        if sel.size:
            out.index_add_(0, torch.from_numpy(pt[sel]), p_rows[torch.from_numpy(sel)].to(F32))
    return out.to(xt)


def _inner_order(ids: np.ndarray, t: np.ndarray, server: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (rows of ids) that hit ``server``, in the hardware's inner order: by the smallest
    expert id they have on that server, then token index.  Returns (row order, hit mask (n, K))."""
    on = (ids // L) // 8 == server
    smallest = np.where(on, ids, np.iinfo(np.int64).max).min(axis=1)
    rows = np.flatnonzero(on.any(axis=1))
    return rows[np.lexsort((t[rows], smallest[rows]))], on


def outer_tables(ids: np.ndarray, L: int, n_srv: int) -> tuple[np.ndarray, np.ndarray]:
    """Source-side tail tables (docs/atlas-a2.md): outerCnt (Bs,) = running count of the servers each
    token goes to; outerOff (Bs*K,) = for each (token, server ascending) ``server*Bs + position of
    the token in that server's inner order``, zero-padded."""
    bs, k = ids.shape
    t = np.arange(bs)
    hit = _servers_hit(ids, L, n_srv)
    pos = np.zeros((bs, n_srv), np.int64)
    for d in range(n_srv):                                   # a loop over servers, not tokens
        order, _ = _inner_order(ids, t, d, L)
        pos[order, d] = np.arange(order.size)
    tt, dd = np.nonzero(hit)                                  # token-major, servers ascending
    off = np.zeros(bs * k, np.int64)
    off[:tt.size] = dd * bs + pos[tt, dd]
    return np.cumsum(hit.sum(axis=1)), off


def inner_tables(ids: np.ndarray, t: np.ndarray, server: int, L: int, W: int, G: int, K: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Relay-side tail tables for one source p (its tokens that reached this relay, t order):
    innerCnt (G,) int16 = running count of this server's hits per token in inner order;
    innerOff (G*K,) = per hit (inner order, then k order) ``rankInServer*G*K + rows of p for the
    earlier local experts of that rank + occurrence of the token among p's tokens of that expert``."""
    order, on = _inner_order(ids, t, server, L)
    cnt = np.zeros(G, np.int64)
    cnt[:order.size] = np.cumsum(on[order].sum(axis=1))
    n = ids.shape[0]
    jj, kk = np.nonzero(on)                                   # every hit, token order then k
    e = ids[jj, kk]
    per_expert = np.bincount(e, minlength=W * L).reshape(W, L)
    before = (np.cumsum(per_expert, axis=1) - per_expert).reshape(-1)
    by_expert = np.lexsort((t[jj], e))                        # occurrence: rank among e's tokens by t
    occ = np.empty(e.size, np.int64)
    starts = np.searchsorted(e[by_expert], e[by_expert])
    occ[by_expert] = np.arange(e.size) - starts
    value = ((e // L) % 8) * G * K + before[e] + occ
    rank_of_row = np.empty(n, np.int64)
    rank_of_row[order] = np.arange(order.size)
    hit_order = np.lexsort((kk, rank_of_row[jj]))            # inner order of tokens, then k
    off = np.zeros(G * K, np.int64)
    off[:e.size] = value[hit_order]
    return cnt, off


def write_tail(tail: torch.Tensor, E: int, G: int, K: int, n_srv: int, inner: dict, outer: tuple) -> None:
    """Place the tables in the int32 ep_recv_counts tail at docs/atlas-a2.md's byte offsets."""
    as16 = tail.view(torch.int16)
    for s, (cnt, off) in inner.items():
        as16[2 * E + G * s: 2 * E + G * (s + 1)] = torch.from_numpy(cnt.astype(np.int16))
        base = E + G * n_srv // 2 + G * K * s
        tail[base: base + G * K] = torch.from_numpy(off.astype(np.int32))
    cnt, off = outer
    base = E + G * n_srv // 2 + G * K * n_srv
    tail[base: base + cnt.size] = torch.from_numpy(cnt.astype(np.int32))
    tail[base + cnt.size: base + cnt.size + off.size] = torch.from_numpy(off.astype(np.int32))
