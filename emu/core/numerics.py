"""Bit-exact arithmetic of the kernels (docs/quantisation.md, docs/combine.md).

Every helper is vectorised over rows.  Each fp32 multiply / divide / add is its own torch
op, so it is rounded once (IEEE round-to-nearest-even), as on the vector unit; no FMA.
Note: ``127.0 / t`` in torch is computed as ``reciprocal(t) * 127`` (two roundings), so
scalar-over-tensor divisions here are written as tensor / tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .inputs import CombineInputs

F32 = torch.float32
_INV_127 = torch.tensor(1.0 / 127.0, dtype=F32)      # fp32 constant 1/127 (combine quant)
COMM_QUANT_GROUP = 8                                  # elements per int8 group (32-byte fp32 block)


def dynamic_quant(rows: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic int8 quantisation of dispatch (quant_mode 2, docs/quantisation.md).

    rows: (n, H) bf16/fp16; smooth: (n, H) fp32 smooth-scale row per output row, or None.
    Returns q (n, H) int8 and scale (n,) fp32 with ``scale = 1 / (127 / amax)``.
    An all-zero row gives q = 0, scale = 0 (docs/errors.md).
    """
    row = rows.to(F32, copy=True)                    # exact widening; worked on in place below
    if smooth is not None:
        row.mul_(smooth)
    amax = row.abs().amax(dim=1) if row.shape[1] else torch.zeros(row.shape[0], dtype=F32)
    d = torch.full_like(amax, 127.0) / amax
    q = row.mul_(d[:, None]).round_()                # fp32 multiply (RNE), then round half to even
    zero = amax == 0
    if bool(zero.any()):
        q[zero] = 0
    scale = torch.ones_like(d) / d                    # 1/inf = 0 for all-zero rows
    return q.to(torch.int8), scale


def tp_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TP reduce of combine (docs/combine.md): bf16 via fp32 add + RNE; fp16 native add."""
    if a.dtype == torch.float16:
        return (a.to(torch.float64) + b.to(torch.float64)).to(torch.float16)
    return (a.to(F32) + b.to(F32)).to(a.dtype)


def comm_quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine int8 wire quantisation (comm_quant_mode 2, docs/quantisation.md).

    y: (n, H) XT.  Returns q (n, H) int8 and per-group scales (n, ceil(H/8)) XT.
    An all-zero group gives q = 0 and scale 0 (docs/errors.md).
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


def combine_tokens(y: torch.Tensor, inp: CombineInputs, slot_mask: torch.Tensor | None,
                   shared_num: int) -> torch.Tensor:
    """The fp32 k-order weighted sum of combine (docs/combine.md) for every token.

    y: (Bs, K + N_s, H) XT received rows (slot k for MoE experts, K + j for shared j);
    ``inp``: expert_ids (Bs, K), expert_scales (Bs, K), the special experts and
    shared_expert_x; slot_mask (Bs, K) bool or None (2-D mask; skipped slots add nothing).
    Returns acc (Bs, H) fp32; the caller rounds to XT and zeroes inactive tokens.
    """
    sp = inp.special
    bs, k_num = inp.expert_ids.shape
    h = y.shape[2]
    ids = inp.expert_ids.to(torch.int64) & 0xFFFFFFFF      # read as unsigned 32-bit
    acc = torch.zeros(bs, h, dtype=F32)
    ori = sp.ori_x.to(F32) if sp.ori_x is not None else None
    const_terms = None
    if sp.const and ori is not None:
        a1 = sp.alpha1.to(F32)
        a2 = sp.alpha2.to(F32)
        v = sp.v.to(F32)
        # (Bs, const, H): oriX*a1[c] + V[c]*a2[c], two RNE multiplies and one RNE add
        const_terms = ori[:, None, :] * a1[None, :, None] + (v * a2[:, None])[None, :, :]
    for k in range(k_num):
        e = ids[:, k]
        w = inp.expert_scales[:, k].to(F32)[:, None]
        on = torch.ones(bs, dtype=torch.bool) if slot_mask is None else slot_mask[:, k]
        term = torch.zeros(bs, h, dtype=F32)
        moe = on & sp.is_moe(e)
        term[moe] = y[moe, k].to(F32) * w[moe]
        contributes = moe.clone()
        if sp.copy and ori is not None:
            cp = on & (e >= sp.copy_start) & (e < sp.copy_start + sp.copy)
            term[cp] = ori[cp] * w[cp]
            contributes |= cp
        if const_terms is not None:
            ct = on & (e >= sp.const_start) & (e < sp.const_start + sp.const)
            if ct.any():
                term[ct] = const_terms[ct.nonzero().squeeze(1), e[ct] - sp.const_start] * w[ct]
            contributes |= ct
        acc[contributes] = acc[contributes] + term[contributes]
    for j in range(shared_num):
        acc = acc + y[:, k_num + j].to(F32)
    if inp.shared_expert_x is not None:
        acc = acc + inp.shared_expert_x.reshape(bs, h).to(F32)
    return acc


@dataclass(frozen=True)
class ReceivedRows:
    """Rows combine received, each for one (token, slot) of this rank.

    rows: (n, H) XT (any row-indexable tensor); token, slot: (m,) int64 numpy; entry i is
    ``rows[index[i]]`` when ``index`` is given (rows straight from a wire buffer), else ``rows[i]``.
    Slot k < K is a MoE expert, slot K + j shared expert j.
    """

    rows: torch.Tensor
    token: np.ndarray
    slot: np.ndarray
    index: np.ndarray | None = None


TERMS_BYTES = 256 << 10       # combine's fp32 terms are made and added in chunks of about this size


def combine_rows(got: ReceivedRows, inp: CombineInputs, slot_mask: torch.Tensor | None,
                 shared_num: int) -> torch.Tensor:
    """The same sum as :func:`combine_tokens`, computed from the received rows directly.

    MoE slots are weighted by expert_scales[t, k], shared slots unweighted: every term is one
    rounded fp32 multiply (XT * fp32 widens exactly).  The terms, slot-major (copy / const
    expert terms after their slot's received rows), are added to their tokens' fp32 sums with
    ``index_add_``, which on the CPU adds its rows one after another in index order: every
    element gets exactly one rounded add per contributing slot, in slot order, as in
    docs/combine.md (tests/test_numerics.py holds torch to that order).  Terms are made in
    chunks of about ``TERMS_BYTES`` (few ops at small H, a cache-sized working set at large H).
    Returns acc (Bs, H) fp32.
    """
    bs, k_num = inp.expert_ids.shape
    h = got.rows.shape[1]
    w = inp.expert_scales.to(F32)
    acc = torch.zeros(bs, h, dtype=F32)
    order = np.argsort(got.slot, kind="stable")          # the index arithmetic is small: numpy
    slot, token = got.slot[order], got.token[order]
    where = torch.from_numpy(order if got.index is None else got.index[order])
    weights = w.detach().numpy()[token, np.minimum(slot, k_num - 1)]
    scale = torch.from_numpy(np.where(slot < k_num, weights, np.float32(1)).astype(np.float32))[:, None]
    n = slot.size
    chunk = max(TERMS_BYTES // max(4 * h, 1), 1)
    work = torch.empty(min(chunk, n) * h, dtype=F32)

    def add_rows(lo: int, hi: int) -> None:
        if lo == 0 and hi == n <= chunk:            # one chunk: no slices
            torch.mul(got.rows.index_select(0, where), scale, out=work.view(n, h))
            acc.index_add_(0, token_t, work.view(n, h))
            return
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            term = work[:(b - a) * h].view(-1, h)
            torch.mul(got.rows.index_select(0, where[a:b]), scale[a:b], out=term)
            acc.index_add_(0, token_t[a:b], term)

    token_t = torch.from_numpy(token)
    done = 0
    special = _special_terms(inp, slot_mask, w)
    if special:                               # each slot's rows, then its copy / const terms
        bounds = np.searchsorted(slot, np.arange(k_num + shared_num + 1)).tolist()
        for t, k, term in special:
            add_rows(done, bounds[k + 1])
            done = bounds[k + 1]
            acc.index_add_(0, t, term)
    add_rows(done, n)
    if inp.shared_expert_x is not None:
        acc.add_(inp.shared_expert_x.reshape(bs, h).to(F32))
    return acc


def _special_terms(inp: CombineInputs, slot_mask: torch.Tensor | None, w: torch.Tensor
                   ) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(tokens, slot, terms) of the copy and const experts, one entry per slot that has some:
    ori_x * w and (ori_x * alpha1 + v * alpha2) * w, each multiply and add rounded on its own."""
    sp = inp.special
    if not ((sp.copy or sp.const) and sp.ori_x is not None):
        return []
    bs, k_num = inp.expert_ids.shape
    ids = inp.expert_ids.to(torch.int64) & 0xFFFFFFFF
    on = torch.ones(bs, k_num, dtype=torch.bool) if slot_mask is None else slot_mask
    ori = sp.ori_x.to(F32)
    copy = on & (ids >= sp.copy_start) & (ids < sp.copy_start + sp.copy)
    const = on & (ids >= sp.const_start) & (ids < sp.const_start + sp.const) if sp.const and sp.v is not None \
        else torch.zeros_like(on)
    if const.any():
        a1 = sp.alpha1.to(F32)
        v2 = sp.v.to(F32) * sp.alpha2.to(F32)[:, None]
    out = []
    for k in torch.nonzero((copy | const).any(dim=0)).flatten().tolist():
        cp = torch.nonzero(copy[:, k]).flatten()
        ct = torch.nonzero(const[:, k]).flatten()
        terms = []
        if cp.numel():
            terms.append((cp, ori[cp] * w[cp, k][:, None]))
        if ct.numel():
            c = ids[ct, k] - sp.const_start
            terms.append((ct, (ori[ct] * a1[c][:, None] + v2[c]) * w[ct, k][:, None]))
        t = torch.cat([x for x, _ in terms])
        out.append((t, k, torch.cat([y for _, y in terms])))
    return out


def combine_output(acc: torch.Tensor, inp: CombineInputs,
                   tokens: np.ndarray) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What combine writes from its fp32 sums ``acc`` (Bs, H): x_out = XT(acc), or with
    ``inp.norm`` the (y, rstd, x) of :func:`add_rms_norm`; rows of inactive tokens (``tokens``
    (Bs,) bool False) are zero (the kernel leaves them unwritten)."""
    off = None if tokens.all() else torch.from_numpy(~tokens)
    if inp.norm is None:
        x_out = acc.to(inp.expand_x.dtype)
        if off is not None:
            x_out[off] = 0
        return x_out
    outs = add_rms_norm(acc, inp.norm.residual_x, inp.norm.gamma, inp.norm.eps, inp.expand_x.dtype)
    for o in outs if off is not None else ():
        o[off] = 0
    return outs


def add_rms_norm(acc: torch.Tensor, residual_x: torch.Tensor, gamma: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """combine_add_rms_norm after the sum, in the kernel's order (docs/combine.md):

        x32  = acc + fp32(residual_x)                 (the combine sum is not rounded first)
        rstd = 1 / sqrt(sum_h(x32*x32 * fp32(1/H)) + fp32(eps))     all fp32, on the unrounded x32
        y    = XT(fp32(XT(x32 * rstd)) * fp32(gamma))                two roundings
        x    = XT(x32)

    The hardware's reduction order is not public: the sum here is torch's fp32 sum (rstd may
    differ from the NPU's in the last bit).  acc (Bs, H) fp32, residual_x (Bs, 1, H), gamma
    (H,).  Returns y (Bs, 1, H) ``dtype``, rstd (Bs, 1, 1) fp32, x (Bs, 1, H) ``dtype``.
    """
    bs, h = acc.shape
    x32 = acc + residual_x.reshape(bs, h).to(F32)
    inv_h = torch.from_numpy(np.float32(1.0) / np.array([h], dtype=np.float32))
    mean_sq = (x32 * x32 * inv_h).sum(dim=1, keepdim=True)
    root = torch.sqrt(mean_sq + torch.tensor(eps, dtype=F32))
    rstd = torch.ones_like(root) / root
    y = ((x32 * rstd).to(dtype).to(F32) * gamma.to(F32)).to(dtype)
    return y.view(bs, 1, h), rstd.view(bs, 1, 1), x32.to(dtype).view(bs, 1, h)
