"""Single-process reference of the Atlas A2 fullmesh path (spec a2.md §2), by hand-checkable
rules: the A3 reference without shared experts for the layout (identical on A2, §2.2), the
occurrence index written straight from its definition, and combine as §2.3 states it: slot
(t, k) of source p with expert e reads row ``prefix(l*W + p - 1) + occ[t*K + k]`` of expert
rank e // L, and out[t] = XT(sum_k fp32(row) * w[t, k]) over p's active tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from .attrs import MoeConfig
from .combine import CombineInputs
from .layout import DispatchOutputs
from .plan import active_set
from .reference import DispatchInputs, reference_dispatch


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
    """a2.md §3.2: the fullmesh layout of every token (mask ignored) quantised once without
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
        tail = torch.zeros(E + 2 * g * inputs[0].expert_ids.shape[1] * (W // 8), dtype=torch.int32)
        tail[:E] = out.ep_recv_counts[:E]
        out.ep_recv_counts = tail
    return outs


def reference_combine_hierarchy(cfg: MoeConfig, inputs: list[CombineInputs],
                                expand_scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """a2.md §3.3: per server d, P_d = XT(fp32(y_k0)*w_k0 + fp32(y_k)*w_k + ...) over the token's
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
