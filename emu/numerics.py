"""Bit-exact arithmetic of the kernels (spec §5, §9.2-§9.4).

Every helper is vectorised over rows.  Each fp32 multiply / divide / add is its own torch
op, so it is rounded once (IEEE round-to-nearest-even), as on the vector unit; no FMA.
Note: ``127.0 / t`` in torch is computed as ``reciprocal(t) * 127`` (two roundings), so
scalar-over-tensor divisions here are written as tensor / tensor.
"""
from __future__ import annotations

import torch

F32 = torch.float32
_INV_127 = torch.tensor(1.0 / 127.0, dtype=F32)      # fp32 constant 1/127 (combine quant)
COMM_QUANT_GROUP = 8                                  # elements per int8 group (32-byte fp32 block)


def dynamic_quant(rows: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic int8 quantisation of dispatch (quant_mode 2, spec §5).

    rows: (n, H) bf16/fp16; smooth: (n, H) fp32 smooth-scale row per output row, or None.
    Returns q (n, H) int8 and scale (n,) fp32 with ``scale = 1 / (127 / amax)``.
    An all-zero row gives q = 0, scale = 0 (spec §15).
    """
    row = rows.to(F32)
    if smooth is not None:
        row = row * smooth
    amax = row.abs().amax(dim=1) if row.shape[1] else torch.zeros(row.shape[0], dtype=F32)
    d = torch.full_like(amax, 127.0) / amax
    q = torch.round(row * d[:, None])
    zero = amax == 0
    q[zero] = 0
    scale = torch.ones_like(d) / d                    # 1/inf = 0 for all-zero rows
    return q.to(torch.int8), scale


def tp_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TP reduce of combine (spec §9.2.1): bf16 via fp32 add + RNE; fp16 native add."""
    if a.dtype == torch.float16:
        return (a.to(torch.float64) + b.to(torch.float64)).to(torch.float16)
    return (a.to(F32) + b.to(F32)).to(a.dtype)


def comm_quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine int8 wire quantisation (comm_quant_mode 2, spec §9.4).

    y: (n, H) XT.  Returns q (n, H) int8 and per-group scales (n, ceil(H/8)) XT.
    An all-zero group gives q = 0 and scale 0 (spec §15).
    """
    n, h = y.shape
    groups = -(-h // COMM_QUANT_GROUP)
    xf = torch.zeros(n, groups * COMM_QUANT_GROUP, dtype=F32)
    xf[:, :h] = y.to(F32)
    xf = xf.view(n, groups, COMM_QUANT_GROUP)
    s = xf.abs().amax(dim=2) * _INV_127
    q = (xf / s[:, :, None]).to(torch.float16).to(F32).round()
    q[(s == 0)[:, :, None].expand_as(q)] = 0
    q = q.reshape(n, groups * COMM_QUANT_GROUP)[:, :h].to(torch.int8)
    return q, s.to(y.dtype)


def comm_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Receiver side of :func:`comm_quant`: ``XT(fp32(q) * fp32(scale))``, (n, H) XT."""
    n, h = q.shape
    per_elem = scale.to(F32).repeat_interleave(COMM_QUANT_GROUP, dim=1)[:, :h]
    return (q.to(F32) * per_elem).to(dtype)


def combine_tokens(y: torch.Tensor, expert_ids: torch.Tensor, expert_scales: torch.Tensor,
                   slot_mask: torch.Tensor | None, moe_expert_num: int, zero: int, copy: int,
                   const: int, shared_num: int, ori_x: torch.Tensor | None,
                   alpha1: torch.Tensor | None, alpha2: torch.Tensor | None,
                   const_v: torch.Tensor | None, shared_expert_x: torch.Tensor | None,
                   ) -> torch.Tensor:
    """The fp32 k-order weighted sum of combine (spec §9.3) for every token.

    y: (Bs, K + N_s, H) XT received rows (slot k for MoE experts, K + j for shared j);
    expert_ids (Bs, K) int32; expert_scales (Bs, K) fp32; slot_mask (Bs, K) bool or None
    (2-D mask; skipped slots add nothing); E = ``moe_expert_num`` (original under elastic).
    Returns acc (Bs, H) fp32; the caller rounds to XT and zeroes inactive tokens.
    """
    bs, k_num = expert_ids.shape
    h = y.shape[2]
    ids = expert_ids.to(torch.int64) & 0xFFFFFFFF          # read as unsigned 32-bit
    acc = torch.zeros(bs, h, dtype=F32)
    ori = ori_x.to(F32) if ori_x is not None else None
    const_terms = None
    if const and ori is not None:
        a1 = alpha1.to(F32)
        a2 = alpha2.to(F32)
        v = const_v.to(F32)
        # (Bs, const, H): oriX*a1[c] + V[c]*a2[c], two RNE multiplies and one RNE add
        const_terms = ori[:, None, :] * a1[None, :, None] + (v * a2[:, None])[None, :, :]
    for k in range(k_num):
        e = ids[:, k]
        w = expert_scales[:, k].to(F32)[:, None]
        on = torch.ones(bs, dtype=torch.bool) if slot_mask is None else slot_mask[:, k]
        term = torch.zeros(bs, h, dtype=F32)
        moe = on & (e < moe_expert_num)
        term[moe] = y[moe, k].to(F32) * w[moe]
        if copy and ori is not None:
            cp = on & (e >= moe_expert_num + zero) & (e < moe_expert_num + zero + copy)
            term[cp] = ori[cp] * w[cp]
        if const_terms is not None:
            base = moe_expert_num + zero + copy
            ct = on & (e >= base) & (e < base + const)
            if ct.any():
                c = (e[ct] - base)
                term[ct] = const_terms[ct.nonzero().squeeze(1), c] * w[ct]
        contributes = moe.clone()
        if copy and ori is not None:
            contributes |= cp
        if const_terms is not None:
            contributes |= ct
        acc[contributes] = acc[contributes] + term[contributes]
    for j in range(shared_num):
        acc = acc + y[:, k_num + j].to(F32)
    if shared_expert_x is not None:
        acc = acc + shared_expert_x.reshape(bs, h).to(F32)
    return acc
