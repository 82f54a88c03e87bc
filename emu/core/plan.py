"""Send plan of one source rank in dispatch (docs/dispatch.md) — pure, numpy, no communication.

A plan lists the rows one EP rank sends, already in wire order: destination rank
ascending; within a destination, local expert ascending, then the source's slot order
(flattened ``t*K + k``, i.e. token order).  That is exactly the order the receiver needs
inside each (source, local expert) block (docs/dispatch.md), so the receiver only has to stable-sort
the blocks it gets from all sources by ``local*W + source``.

The same plan tells combine, on the source, how many rows come back from each rank.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .attrs import Geometry
from .placement import moe_local_of, moe_rank_of, shared_replica


@dataclass(frozen=True)
class ActiveSet:
    """Which tokens / (token, k) slots of one rank take part (docs/dispatch.md).

    tokens: (Bs,) bool — token sent to shared experts and combined.
    slots:  (Bs, K) bool — slot sent to its MoE expert (before the special-id filter).
    slot_mask: (Bs, K) bool or None — the 2-D mask itself (combine skips False slots).
    """

    tokens: np.ndarray
    slots: np.ndarray
    slot_mask: np.ndarray | None


def active_set(bs: int, k: int, mask: torch.Tensor | None) -> ActiveSet:
    """Active tokens and slots for mask None, 1-D ``(Bs,)`` or 2-D ``(Bs, K)`` bool.

    A 1-D mask counts its True values n and activates tokens ``0..n-1`` (hardware
    popcount prefix, docs/dispatch.md), whatever the positions of the True values.
    """
    if mask is None:
        return ActiveSet(np.ones(bs, bool), np.ones((bs, k), bool), None)
    m = mask.detach().cpu().numpy().astype(bool)
    if m.ndim == 1:
        tokens = np.arange(bs) < int(m.sum())
        return ActiveSet(tokens, np.repeat(tokens[:, None], k, axis=1), None)
    return ActiveSet(m.any(axis=1), m.copy(), m.copy())


def warn_non_prefix_mask(mask: torch.Tensor | None) -> None:
    """Warn when a 1-D mask is not True-before-False (the kernel treats it as a prefix)."""
    if mask is not None and mask.dim() == 1 and mask.numel() > 1:
        m = mask.to(torch.int8)
        if bool((m[1:] > m[:-1]).any()):
            warnings.warn(f"x_active_mask {mask.tolist()} is not True-before-False; like the hardware, "
                          f"mc2-emu treats it as its first {int(m.sum())} tokens", stacklevel=3)


@dataclass(frozen=True)
class SendPlan:
    """Rows one source sends in dispatch, in wire order. All arrays int64, shape (n,).

    token: index t in the source's x;  slot: k (MoE) or K + j (shared expert j);
    dest: EP rank;  local: local expert on dest (0 for shared);
    smooth_row: row of ``scales`` used to quantise the copy (N_s + e, or j);
    counts: (W,) rows per destination;  n_active: active tokens of the source.
    """

    token: np.ndarray
    slot: np.ndarray
    dest: np.ndarray
    local: np.ndarray
    smooth_row: np.ndarray
    counts: np.ndarray
    n_active: int


def send_plan(geom: Geometry, src: int, expert_ids: torch.Tensor, act: ActiveSet) -> SendPlan:
    """The dispatch send plan of EP rank ``src`` (docs/dispatch.md)."""
    ids = expert_ids.detach().cpu().numpy().astype(np.int64)
    bs, k = ids.shape
    moe_slots = act.slots.copy()
    if geom.special:
        moe_slots &= ids < geom.E                    # special experts are never sent (docs/dispatch.md)
    flat = np.flatnonzero(moe_slots.reshape(-1))     # (t*K + k) increasing
    e = ids.reshape(-1)[flat]
    moe_token, moe_slot = flat // k, flat % k

    tokens = np.flatnonzero(act.tokens)
    ns = geom.Ns
    sh_token = np.repeat(tokens, ns)
    sh_j = np.tile(np.arange(ns), tokens.size)
    token = np.concatenate([moe_token, sh_token])
    slot = np.concatenate([moe_slot, k + sh_j])
    dest = np.concatenate([moe_rank_of(geom, e), shared_replica(geom, src, sh_j)]).astype(np.int64)
    local = np.concatenate([moe_local_of(geom, e), np.zeros_like(sh_j)])
    smooth_row = np.concatenate([ns + e, sh_j])
    seq = np.concatenate([flat, sh_token])
    order = np.lexsort((seq, local, dest))
    return SendPlan(token=token[order], slot=slot[order], dest=dest[order], local=local[order],
                    smooth_row=smooth_row[order],
                    counts=np.bincount(dest, minlength=geom.W).astype(np.int64),
                    n_active=int(tokens.size))


def send_counts(geom: Geometry, src: int, expert_ids: torch.Tensor, act: ActiveSet) -> np.ndarray:
    """``send_plan(...).counts`` alone: (W,) int64 rows EP rank ``src`` sends each rank."""
    ids = expert_ids.detach().cpu().numpy()
    moe = act.slots & (ids < geom.E) if geom.special else act.slots
    e = ids[moe] if not moe.all() else ids.reshape(-1)
    counts = np.bincount(moe_rank_of(geom, e.astype(np.int64)), minlength=geom.W)
    if geom.Ns:
        n_tok = int(np.count_nonzero(act.tokens))
        np.add.at(counts, shared_replica(geom, src, np.arange(geom.Ns)), n_tok)
    return counts.astype(np.int64)


def expand_idx(expert_ids: torch.Tensor, mask: torch.Tensor | None, moe_expert_num: int) -> torch.Tensor:
    """V1's expand_idx, A2's third output: for each slot (t, k), how many earlier active MoE
    slots of this rank chose the same expert (0 for inactive and special slots); (Bs*K,) int32."""
    ids = expert_ids.numpy().astype(np.int64).reshape(-1)
    act = active_set(*expert_ids.shape, mask).slots.reshape(-1) & (ids < moe_expert_num) & (ids >= 0)
    occ = np.zeros(ids.size, dtype=np.int64)
    pos = np.flatnonzero(act)
    if pos.size:
        e = ids[pos]
        order = np.argsort(e, kind="stable")
        first = np.searchsorted(e[order], e[order])                   # start of each expert's run
        occ[pos[order]] = np.arange(pos.size) - first
    return torch.from_numpy(occ.astype(np.int32))
