"""Single-process reference of a whole world: every rank's inputs in, every rank's outputs out.

Written to be checked by hand, independently of the distributed path's plan/layout code:
all (source, token, slot) rows of an EP domain go into one table, and one global sort by
(destination, local expert, source, t*K + k) gives every receiver's expand_x at once
(docs/dispatch.md).  Shared pieces: mask semantics (``core.plan.active_set``), numerics
(``core.numerics``, checked on hand-worked cases) and the eager output shapes.

World layout (docs/dispatch.md): world rank ``g = ep_rank * T + tp_rank`` with ``T = 2`` if
tp_world_size == 2 else 1; the EP domain of TP index ``i`` is ``{e*T + i}``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.attrs import Geometry, MoeConfig
from ..core.inputs import CombineInputs, DispatchInputs
from ..core.layout import DispatchOutputs, dispatch_shapes
from ..core.numerics import comm_dequant, comm_quant, combine_output, combine_tokens, dynamic_quant, tp_add
from ..core.placement import Remap
from ..core.plan import active_set


def tp_span(cfg: MoeConfig) -> int:
    return 2 if cfg.tp_world_size == 2 else 1


def world_rank(cfg: MoeConfig, ep_rank: int, tp_rank: int = 0) -> int:
    return ep_rank * tp_span(cfg) + tp_rank


def _slot_table(cfg: MoeConfig, geom: Geometry, inputs: list[DispatchInputs]) -> dict[str, np.ndarray]:
    """Every row the EP domain sends: columns src, t, k, dest, local, seq, srow (int64)."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("src", "t", "k", "dest", "local", "seq", "srow")}
    K, E, L, S, Ns, R = geom.K, geom.E, geom.L, geom.S, geom.Ns, geom.R
    for src, inp in enumerate(inputs):
        ids = inp.expert_ids.numpy().astype(np.int64)
        act = active_set(ids.shape[0], K, inp.x_active_mask)
        keep = act.slots & (ids < E) if geom.special else act.slots
        t, k = np.nonzero(keep)                               # row-major: t*K + k increasing
        e = ids[t, k]
        tok = np.flatnonzero(act.tokens)
        jt, jj = np.repeat(tok, Ns), np.tile(np.arange(Ns), tok.size)
        for name, moe, shared in (("src", np.full_like(t, src), np.full_like(jt, src)),
                                  ("t", t, jt), ("k", k, K + jj), ("dest", S + e // L, src % R + jj * R if R else jj),
                                  ("local", e % L, 0 * jj), ("seq", t * K + k, jt), ("srow", Ns + e, jj)):
            cols[name] += [moe, shared]
    return {c: np.concatenate(v).astype(np.int64) for c, v in cols.items()}


def domains(cfg: MoeConfig, elastic_info: torch.Tensor | None = None) -> list[list[int]]:
    """World ranks of each EP domain, in logical-id order (new ids under elastic scaling)."""
    T, W = tp_span(cfg), cfg.ep_world_size
    remap = Remap.parse(elastic_info, W) if elastic_info is not None else None
    if remap is not None and remap.active:
        return [[int(r) for r in remap.survivors()]]
    return [[world_rank(cfg, e, i) for e in range(W)] for i in range(T)]


def _routing(cfg: MoeConfig, geom: Geometry, elastic_info: torch.Tensor | None) -> Geometry:
    return Remap.parse(elastic_info, cfg.ep_world_size).routing(geom) if elastic_info is not None else geom


def reference_dispatch(cfg: MoeConfig, inputs: list[DispatchInputs | None],
                       elastic_info: torch.Tensor | None = None) -> list[DispatchOutputs | None]:
    """Dispatch outputs of every world rank (list indexed by world rank; None for ranks an
    active ``elastic_info`` removes, whose inputs may be None too)."""
    T = tp_span(cfg)
    outs: list[DispatchOutputs | None] = [None] * (cfg.ep_world_size * T)
    own_rows: dict[int, tuple] = {}
    for members in domains(cfg, elastic_info):
        dom = [inputs[g] for g in members]
        k = dom[0].expert_ids.shape[1]
        h = dom[0].x.shape[1]
        orig = Geometry.of(cfg, dom[0].x.shape[0], k, h)
        geom = _routing(cfg, orig, elastic_info)                  # W', S', E' when elastic
        W = geom.W
        tab = _slot_table(cfg, geom, dom)
        order = np.lexsort((tab["seq"], tab["src"], tab["local"], tab["dest"]))
        tab = {c: v[order] for c, v in tab.items()}
        offsets = np.cumsum([0] + [d.x.shape[0] for d in dom])
        xcat = torch.cat([d.x for d in dom])
        rows = xcat[torch.from_numpy(offsets[tab["src"]] + tab["t"])]
        scale = None
        if cfg.quant_mode == 2:
            smooth = None
            if dom[0].scales is not None:
                smooth = torch.stack([d.scales for d in dom])[torch.from_numpy(tab["src"]), torch.from_numpy(tab["srow"])]
            rows, scale = dynamic_quant(rows, smooth)
        bounds = np.searchsorted(tab["dest"], np.arange(W + 1))      # tab is sorted by dest
        for e, g in enumerate(members):
            sel = np.arange(bounds[e], bounds[e + 1])
            lr = geom.local_expert_num(e)
            shapes = dispatch_shapes(orig, g // T, dom[e].x.shape[0], elastic=elastic_info is not None,
                                     expert_scales=dom[e].expert_scales is not None)
            out = DispatchOutputs.allocate(shapes, h, rows.dtype)
            n = sel.size
            out.expand_x[:n] = rows[torch.from_numpy(sel)]
            if scale is not None:
                out.dynamic_scales[:n] = scale[torch.from_numpy(sel)]
            tri = np.stack([tab["src"][sel], tab["t"][sel], tab["k"][sel]], axis=1)
            out.assist_info_for_combine[:3 * n] = torch.from_numpy(tri.reshape(-1).astype(np.int32))
            counts = np.bincount(tab["local"][sel] * W + tab["src"][sel], minlength=W * lr)
            cum = np.cumsum(counts)
            out.ep_recv_counts[:W * lr] = torch.from_numpy(cum.astype(np.int32))
            own_rows[g] = (n, cum, lr, W)
            outs[g] = out
    for g, out in enumerate(outs):
        if out is None:
            continue
        n, cum, lr, W = own_rows[g]
        total = n
        if T == 2:
            peer = g ^ 1
            pn, pcum, _, _ = own_rows[peer]
            src = outs[peer]
            out.expand_x[n:n + pn] = src.expand_x[:pn]
            out.dynamic_scales[n:n + pn] = src.dynamic_scales[:pn]
            out.ep_recv_counts[W:2 * W] = torch.from_numpy(pcum.astype(np.int32))
            out.tp_recv_counts[g % 2] = n
            out.tp_recv_counts[peer % 2] = pn
            total += pn
        if lr == 1:
            out.expert_token_nums[0] = total
        else:
            ends = cum.reshape(lr, W)[:, -1]
            out.expert_token_nums[:lr] = torch.from_numpy(ends if cfg.expert_token_nums_type == 0
                                                          else np.diff(ends, prepend=0))
    return outs


def reference_combine(cfg: MoeConfig, inputs: list[CombineInputs | None],
                      elastic_info: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """x_out of every world rank (list indexed by world rank; None for removed ranks), docs/combine.md.
    The special-expert ranges use the ORIGINAL moe_expert_num, also under elastic scaling."""
    T = tp_span(cfg)
    outs: list[torch.Tensor | None] = [None] * (cfg.ep_world_size * T)
    for members in domains(cfg, elastic_info):
        dom = [inputs[g] for g in members]
        h = dom[0].expand_x.shape[1]
        xt = dom[0].expand_x.dtype
        geom = _routing(cfg, Geometry.of(cfg, dom[0].expert_ids.shape[0], dom[0].expert_ids.shape[1], h),
                        elastic_info)
        W = geom.W
        K, Ns = geom.K, geom.Ns
        # every source's (token, slot) cells in one tensor: cell (src, t, k) at row off[src] + t
        off = np.cumsum([0] + [d.expert_ids.shape[0] for d in dom])
        cells = torch.zeros(int(off[-1]), K + Ns, h, dtype=xt)
        for e, g in enumerate(members):
            inp = dom[e]
            own = int(inp.ep_send_counts[geom.recv_blocks(e) - 1])
            y = inp.expand_x[:own]
            if T == 2:
                peer = inputs[g ^ 1]
                peer_own = int(peer.ep_send_counts[W - 1])
                y = tp_add(y, peer.expand_x[peer_own:peer_own + own])
            if cfg.comm_quant_mode == 2:
                y = comm_dequant(*comm_quant(y), xt)
            tri = inp.assist_info[:3 * own].to(torch.int64).view(own, 3)
            cells[torch.from_numpy(off)[tri[:, 0]] + tri[:, 1], tri[:, 2]] = y
        slots = [cells[off[e]:off[e + 1]] for e in range(W)]
        for e, g in enumerate(members):
            inp = dom[e]
            act = active_set(*inp.expert_ids.shape, inp.x_active_mask)
            acc = combine_tokens(slots[e], inp, None if act.slot_mask is None else torch.from_numpy(act.slot_mask),
                                 Ns)
            outs[g] = combine_output(acc, inp, act.tokens)
    return outs
