"""Receive-side layout of dispatch and the eager output shapes (docs/dispatch.md).

Pure numpy: given, for every received row, its source rank and local expert (rows in
wire order = source-major), compute where each row lands and the count outputs.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from .attrs import Geometry
from .errors import TILING_ERROR, AclnnError


@dataclass(frozen=True)
class RecvLayout:
    """order: (n,) int64 permutation, output row i = received row ``order[i]``;
    block_counts: (W*L_r,) int64 rows per status index ``l*W + src``;
    ep_recv_counts: (W*L_r,) int64 inclusive running prefix of block_counts (docs/dispatch.md)."""

    order: np.ndarray
    block_counts: np.ndarray
    ep_recv_counts: np.ndarray


def recv_layout(geom: Geometry, rank: int, src: np.ndarray, local: np.ndarray) -> RecvLayout:
    """Layout on EP rank ``rank``: blocks local-expert major, source minor (docs/dispatch.md).

    ``src`` / ``local``: (n,) int64 per received row, in wire order (source ascending,
    each source's rows already in its slot order).
    """
    status = local * geom.W + src
    order = np.argsort(status, kind="stable")
    counts = np.bincount(status, minlength=geom.recv_blocks(rank)).astype(np.int64)
    return RecvLayout(order=order, block_counts=counts, ep_recv_counts=np.cumsum(counts))


def expert_token_nums(geom: Geometry, rank: int, ep_recv_counts: np.ndarray, total_rows: int,
                      nums_type: int) -> np.ndarray:
    """expertTokenNums (docs/dispatch.md): (L_r,) int64.

    L == 1 or shared rank: total rows (own + TP peer).  L > 1: per local expert, the
    running total at the end of its block (type 0) or its own count (type 1).
    """
    lr = geom.local_expert_num(rank)
    if lr == 1:
        return np.array([total_rows], dtype=np.int64)
    cum = ep_recv_counts.reshape(lr, geom.W)[:, -1].astype(np.int64)
    if nums_type == 0:
        return cum
    return np.diff(cum, prepend=0)


ALLOCATIONS = ("eager", "graph")


def allocation_mode() -> str:
    """``EMU_ALLOCATION``: "eager" (default) sizes outputs as torch_npu's eager kernels do;
    "graph" as its meta functions do under graph capture (docs/dispatch.md, "Output shapes")."""
    mode = os.environ.get("EMU_ALLOCATION", "eager").strip().lower() or "eager"
    if mode not in ALLOCATIONS:
        raise AclnnError(TILING_ERROR, f"EMU_ALLOCATION={mode!r} must be one of {ALLOCATIONS}")
    return mode


@dataclass(frozen=True)
class DispatchShapes:
    """The output lengths torch_npu 2.14 allocates for one rank (docs/dispatch.md).

    rows: expand_x dim 0 = A*max(tp, 1); capacity: A; dynamic_scales: A*max(tp, 1);
    assist: assist_info_for_combine max(Bs*K, 128*A) (V1's third output is expand_idx, Bs*K);
    token_nums: local experts; ep_recv: ep_recv_counts; tp_recv: tp; expand_scales: A, or 0.
    """

    rows: int
    capacity: int
    dynamic_scales: int
    assist: int
    token_nums: int
    ep_recv: int
    tp_recv: int
    expand_scales: int


def dispatch_shapes(geom: Geometry, rank: int, bs: int, *, elastic: bool = False, expert_scales: bool = False,
                    v1: bool = False, graph: bool = False) -> DispatchShapes:
    """torch_npu's allocation from the ORIGINAL attributes (``geom`` not remapped).

    A shared rank may receive ``maxBs * ceil(W / R)`` rows (V1: ``G // S``), a MoE rank
    ``G * min(L, K)``.  With ``elastic_info`` given (any flag) a rank may change role: with
    shared experts every rank gets ``max`` of both and L token counts (without, the MoE rule).
    ``expert_scales`` given (A2's hierarchy input) adds the hierarchy tail to ep_recv_counts,
    ``W*L_r + 2*G*K*(W//8)``, dropping the x2 of tp 2.  expand_scales has A entries, except
    under ``graph`` (the meta functions) where it has 0 unless ``expert_scales`` is given.
    """
    tp, shared = geom.tp, geom.is_shared(rank)
    if shared:
        local, a = 1, (geom.G // geom.S if v1 else geom.a_shared)
    else:
        local, a = geom.L, geom.a_moe
    if elastic and not v1:
        local = max(local, geom.L)
        a = max(geom.a_shared, geom.a_moe) if geom.R else geom.a_moe
    ep_recv = geom.W * local * (2 if tp == 2 else 1)
    if expert_scales:
        ep_recv = geom.W * local + 2 * geom.G * geom.K * (geom.W // 8)
    return DispatchShapes(rows=max(a, a * tp), capacity=a, dynamic_scales=a * max(tp, 1),
                          assist=max(bs * geom.K, 128 * a), token_nums=local,
                          ep_recv=ep_recv, tp_recv=tp, expand_scales=0 if graph and not expert_scales else a)


MAP_BYTES = 1 << 20          # lazy_zeros maps its own pages from this size on
HEAP_BYTES = 32 << 20        # the largest block glibc's heap serves (it maps larger ones itself)
HUGE = getattr(mmap, "MADV_HUGEPAGE", None)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fresh zero tensor whose pages the OS zeroes only when they are first touched: outputs
    of A*H rows cost what is written, not their size.  Large ones are an anonymous mapping of
    their own (calloc would reuse freed heap memory, which it must clear, touching every page);
    the mapping is released with the tensor."""
    nbytes = _nbytes(shape, dtype)
    if nbytes < MAP_BYTES:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if HUGE is not None:
        pages.madvise(HUGE)                 # huge pages where the OS allows: one fault per 2 MB written
    raw = np.frombuffer(pages, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


@dataclass
class DispatchOutputs:
    """The 7 outputs of dispatch_v2, in torch_npu's order.

    expand_x (A*max(tp,1), H) XT or int8; dynamic_scales (A*max(tp,1),) fp32;
    assist_info_for_combine (max(Bs*K, 128*A),) int32; expert_token_nums (L_r,) int64;
    ep_recv_counts (W*L_r*(2 if tp==2 else 1),) int32, or with expert_scales
    (W*L_r + 2*G*K*(W//8),); tp_recv_counts (tp,) int32; expand_scales (A,) fp32 (A2
    hierarchy writes it; zeros elsewhere), (0,) under graph allocation without expert_scales.
    """

    expand_x: torch.Tensor
    dynamic_scales: torch.Tensor
    assist_info_for_combine: torch.Tensor
    expert_token_nums: torch.Tensor
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor
    expand_scales: torch.Tensor
    uncleared: bool = False          # expand_x, dynamic_scales, assist_info: see allocate()

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.expand_x, self.dynamic_scales, self.assist_info_for_combine,
                self.expert_token_nums, self.ep_recv_counts, self.tp_recv_counts,
                self.expand_scales)

    @classmethod
    def allocate(cls, shapes: DispatchShapes, h: int, dtype: torch.dtype,
                 expect_rows: int | None = None) -> "DispatchOutputs":
        """Zero-filled outputs at the eager shapes (regions the hardware leaves unwritten stay
        0, docs/errors.md).  The large ones come zeroed from the OS, so only what is written is
        touched; or, when the caller expects to write at least a third of expand_x's rows
        (``expect_rows``) and it fits the heap, expand_x, dynamic_scales and assist_info are
        uncleared heap memory and the caller clears the rest with :meth:`clear_unwritten`: a
        decode loop then gets back the warm block its previous call freed (at 7 MB, writing it
        costs 0.3 ms, faulting in fresh pages 1.5-4 ms on this machine)."""
        rows = (shapes.rows, h)
        if expect_rows is not None and 3 * expect_rows >= shapes.rows and _nbytes(rows, dtype) < HEAP_BYTES:
            big, uncleared = torch.empty, True
        else:
            big, uncleared = lazy_zeros, False
        return cls(expand_x=big(rows, dtype=dtype),
                   dynamic_scales=big((shapes.dynamic_scales,), dtype=torch.float32),
                   assist_info_for_combine=big((shapes.assist,), dtype=torch.int32),
                   expert_token_nums=torch.zeros(shapes.token_nums, dtype=torch.int64),
                   ep_recv_counts=torch.zeros(shapes.ep_recv, dtype=torch.int32),
                   tp_recv_counts=torch.zeros(shapes.tp_recv, dtype=torch.int32),
                   expand_scales=torch.zeros(shapes.expand_scales, dtype=torch.float32),
                   uncleared=uncleared)

    def clear_unwritten(self, rows: int, scale_rows: int, assist: int) -> None:
        """Of outputs allocated uncleared: zero expand_x past ``rows``, dynamic_scales past
        ``scale_rows`` and assist_info past ``assist`` entries (what the call did not write)."""
        if self.uncleared:
            self.expand_x[rows:].zero_()
            self.dynamic_scales[scale_rows:].zero_()
            self.assist_info_for_combine[assist:].zero_()
            self.uncleared = False
