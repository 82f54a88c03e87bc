"""Single-process reference of the Atlas A2 fullmesh path (docs/atlas-a2.md), by hand-checkable
rules: the A3 reference without shared experts for the layout (identical on A2, docs/dispatch.md), the
occurrence index written straight from its definition, and combine as docs/dispatch.md states it: slot
(t, k) of source p with expert e reads row ``prefix(l*W + p - 1) + occ[t*K + k]`` of expert
rank e // L, and out[t] = XT(sum_k fp32(row) * w[t, k]) over p's active tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.attrs import MoeConfig
from ..core.inputs import CombineInputs, DispatchInputs
from ..core.layout import DispatchOutputs
from ..core.plan import active_set
from .a3 import reference_dispatch


def occurrences(expert_ids: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """occ[t*K + k]: earlier active slots of this rank with the same expert (0 when inactive)."""
    ids = expert_ids.numpy().astype(np.int64).reshape(-1)
    act = active_set(*expert_ids.shape, mask).slots.reshape(-1)
    occ = np.zeros(ids.size, np.int64)
    seen: dict[int, int] = {}
    for i in np.flatnonzero(act):              # a loop over one rank's slots: the definition itself
        occ[i] = seen.get(int(ids[i]), 0)
        seen[int(ids[i])] = occ[i] + 1
    return occ


def reference_dispatch_a2(cfg: MoeConfig, inputs: list[DispatchInputs],
                          expert_scales_given: bool = False) -> list[DispatchOutputs]:
    outs = reference_dispatch(cfg, inputs)
    W, E = cfg.ep_world_size, cfg.moe_expert_num
    for out, inp in zip(outs, inputs):
        out.assist_info_for_combine.zero_()
        n = int(active_set(*inp.expert_ids.shape, inp.x_active_mask).tokens.sum()) * inp.expert_ids.shape[1]
        out.assist_info_for_combine[:n] = torch.from_numpy(occurrences(inp.expert_ids, inp.x_active_mask)[:n]
                                                           .astype(np.int32))
        if expert_scales_given:
            g = cfg.global_bs or inp.x.shape[0] * W
            tail = torch.zeros(E + 2 * g * inp.expert_ids.shape[1] * (W // 8), dtype=torch.int32)
            tail[:E] = out.ep_recv_counts[:E]
            out.ep_recv_counts = tail
    return outs


def reference_combine_a2(cfg: MoeConfig, inputs: list[CombineInputs]) -> list[torch.Tensor]:
    W, E = cfg.ep_world_size, cfg.moe_expert_num
    L = E // W
    outs = []
    for p, inp in enumerate(inputs):
        bs, k = inp.expert_ids.shape
        act = active_set(bs, k, inp.x_active_mask)
        occ = occurrences(inp.expert_ids, inp.x_active_mask).reshape(bs, k)
        ids = inp.expert_ids.numpy().astype(np.int64)
        acc = torch.zeros(bs, inp.expand_x.shape[1], dtype=torch.float32)
        for kk in range(k):
            t = np.flatnonzero(act.tokens)
            e = ids[t, kk]
            rows = []
            for ti, ei, oi in zip(t, e, occ[t, kk]):
                m, l = ei // L, ei % L
                counts = inputs[m].ep_send_counts
                start = int(counts[l * W + p - 1]) if l * W + p > 0 else 0
                rows.append(inputs[m].expand_x[start + oi])
            if rows:
                y = torch.stack(rows).to(torch.float32) * inp.expert_scales[torch.from_numpy(t), kk][:, None]
                acc[torch.from_numpy(t)] = acc[torch.from_numpy(t)] + y
        x_out = acc.to(inp.expand_x.dtype)
        x_out[torch.from_numpy(~act.tokens)] = 0
        outs.append(x_out)
    return outs


def reference_dispatch_hierarchy(cfg: MoeConfig, inputs: list[DispatchInputs],
                                 expert_scales: list[torch.Tensor]) -> list[DispatchOutputs]:
    """docs/atlas-a2.md: the fullmesh layout of every token (mask ignored) quantised once without
    smoothing, expand_scales[row] = expert_scales_p[t, k], no assist, a zero tail of
    2*G*K*(W/8) entries after the E counts."""
    plain = [DispatchInputs(x=d.x, expert_ids=d.expert_ids) for d in inputs]
    outs = reference_dispatch(cfg, plain)
    W, E = cfg.ep_world_size, cfg.moe_expert_num
    for out in outs:
        n = int(out.ep_recv_counts[E - 1])
        tri = out.assist_info_for_combine[:3 * n].view(n, 3).to(torch.int64)
        out.expand_scales[:n] = torch.stack([expert_scales[int(p)][int(t), int(k)] for p, t, k in tri.tolist()]) \
            if n else torch.zeros(0)
        out.assist_info_for_combine.zero_()
    g = cfg.global_bs or inputs[0].x.shape[0] * W
    k = inputs[0].expert_ids.shape[1]
    for r, out in enumerate(outs):
        tail = torch.zeros(E + 2 * g * k * (W // 8), dtype=torch.int32)
        tail[:E] = out.ep_recv_counts[:E]
        _tail_tables(tail, r, [d.expert_ids.numpy().astype(np.int64) for d in inputs], W, E // W, g, k)
        out.ep_recv_counts = tail
    return outs


def _tail_tables(tail: torch.Tensor, r: int, ids: list[np.ndarray], W: int, L: int, G: int, K: int) -> None:
    """docs/atlas-a2.md's tables on rank r, written from their definitions, token by token."""
    E, N = W * L, W // 8
    d, i = divmod(r, 8)
    srv = lambda e: int(e) // L // 8                                          # noqa: E731
    c16 = tail.view(torch.int16)

    def inner_order(p_ids: np.ndarray, server: int) -> list[int]:
        toks = [t for t in range(p_ids.shape[0]) if any(srv(e) == server for e in p_ids[t])]
        return sorted(toks, key=lambda t: (min(int(e) for e in p_ids[t] if srv(e) == server), t))

    for s_src in range(N):                              # relay tables: source p = 8*s_src + i
        p_ids = ids[8 * s_src + i]
        order = inner_order(p_ids, d)
        running, offs = 0, []
        for j, t in enumerate(order):
            for e in p_ids[t]:
                if srv(e) != d:
                    continue
                running += 1
                rank, l = int(e) // L, int(e) % L
                before = sum(int((p_ids == rank * L + l2).sum()) for l2 in range(l))
                occ = int((p_ids[:t] == e).sum())
                offs.append((rank % 8) * G * K + before + occ)
            c16[2 * E + G * s_src + j] = running
        base = E + G * N // 2 + G * K * s_src
        for h, v in enumerate(offs):
            tail[base + h] = v
    own = ids[r]                                          # source tables
    bs = own.shape[0]
    pos = {dd: {t: j for j, t in enumerate(inner_order(own, dd))} for dd in range(N)}
    base = E + G * N // 2 + G * K * N
    running, h = 0, 0
    for t in range(bs):
        servers = sorted({srv(e) for e in own[t]})
        running += len(servers)
        tail[base + t] = running
        for dd in servers:
            tail[base + bs + h] = dd * bs + pos[dd][t]
            h += 1


def reference_combine_hierarchy(cfg: MoeConfig, inputs: list[CombineInputs],
                                expand_scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """docs/atlas-a2.md: per server d, P_d = XT(fp32(y_k0)*w_k0 + fp32(y_k)*w_k + ...) over the token's
    hits on d in k order (w = the holder's expand_scales of the row); out = XT(0 + P_0 + P_1 ...)
    in increasing server order, for every token (mask ignored)."""
    W, E = cfg.ep_world_size, cfg.moe_expert_num
    L = E // W
    outs = []
    for p, inp in enumerate(inputs):
        bs, k = inp.expert_ids.shape
        ids = inp.expert_ids.numpy().astype(np.int64)
        occ = occurrences(inp.expert_ids, None).reshape(bs, k)
        xt = inp.expand_x.dtype
        out = torch.zeros(bs, inp.expand_x.shape[1], dtype=xt)
        for t in range(bs):                                  # the definition, token by token
            acc_out = torch.zeros(inp.expand_x.shape[1], dtype=torch.float32)
            for d in sorted({int(e // L // 8) for e in ids[t]}):
                acc = None
                for kk in range(k):
                    e = int(ids[t, kk])
                    if e // L // 8 != d:
                        continue
                    m, l = e // L, e % L
                    counts = inputs[m].ep_send_counts
                    row = (int(counts[l * W + p - 1]) if l * W + p > 0 else 0) + int(occ[t, kk])
                    term = inputs[m].expand_x[row].to(torch.float32) * expand_scales[m][row]
                    acc = term if acc is None else acc + term
                acc_out = acc_out + acc.to(xt).to(torch.float32)
            out[t] = acc_out.to(xt)
        outs.append(out)
    return outs
