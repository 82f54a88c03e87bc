"""torch_npu's MoE routing operators on the CPU, with torch_npu 2.14.0's signatures.

The semantics are the Atlas A2 / A3 kernels' (hicann/ops-transformer ``moe/*``: the aclnn checks,
the tilings and the AscendC kernels), checked against Huawei's own goldens (Ascend/op-plugin
``test/test_custom_ops``); where those and torch_npu's API docs disagree, the kernel wins (each
case is named below).  Inputs are plain CPU tensors; outputs have torch_npu's eager shapes.

Errors follow :mod:`emu.core.contract`: what the operator rejects raises
:class:`~emu.core.errors.AclnnError` with its code (161002 torch_npu's adapter checks and the
aclnn checks, 561002 the tiling's); input outside the documented contract that the kernel
silently accepts (re_routing counts that do not add up to the tokens, an ignored ``offset``,
expert ids past ``expert_num``, ...) is computed as the kernel computes it, with a
:class:`~emu.core.errors.ContractWarning` (``EMU_STRICT=1``: an error).  docs/torch-npu.md has
the table of these cases.

* ``npu_moe_gating_top_k_softmax``: softmax over experts in fp32, top-k (ties: the lower expert
  first), ``finished`` rows get expert id E; row_idx in k-major order.
* ``npu_moe_init_routing``: stable sort of the (token, k) pairs by expert; gather index, rows.
* ``npu_moe_init_routing_v2`` (aclnnMoeInitRoutingV3): what the A2 / A3 tiling
  (``moe_init_routing_v3_tiling.cpp``) accepts: dropless only, ``active_num`` -1 or N * K,
  expert counts (1) or key-value (2) with ``expert_tokens_num_flag`` True, ``quant_mode`` -1 or
  1 (dynamic int8, optional (end - start, H) smooth scale), gather or scatter row index,
  ``active_expert_range``; ``x_dtype`` relabels x (quant -1).  The kernel sorts every pair with
  experts below the range last: the scatter index lists all N * K pairs (the range's first).
  An empty x returns at once (torch_npu's adapter), before any check of scale.
* ``npu_moe_finalize_routing`` (aclnnMoeFinalizeRoutingV2): all four ``drop_pad_mode`` s (column /
  row index layout, -1 = a dropped slot, read as a zero row).
* ``npu_moe_compute_expert_tokens``: per expert, the end of its run in the sorted list.
* ``npu_moe_re_routing``: rank-major tokens to expert-major, count mode, gather index, as the A2 /
  A3 kernel walks the counts (blocks past the token count are not written).

Entries the docs call "uninitialised" or "meaningless" are filled deterministically: -1 for
indices, 0 for rows, scales and counts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.contract import reject, tolerate
from ..core.errors import PARAM_INVALID, PARAM_NULLPTR, TILING_ERROR
from .dtypes import NPU_DTYPES, dtype_name, torch_dtype

__all__ = ["npu_moe_compute_expert_tokens", "npu_moe_finalize_routing", "npu_moe_gating_top_k_softmax",
           "npu_moe_init_routing", "npu_moe_init_routing_v2", "npu_moe_re_routing"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_V2_X_DTYPES = _FLOATS + (torch.int8,)                 # aclnn_moe_init_routing_v3.cpp DTYPE_SUPPORT_LIST_X
_V2_EXPERT_MAX = 10240                                 # moe_init_routing_v3_tiling.cpp EXPERT_IDX_MAX
_V2_KV_EXPERT_MAX = _V2_EXPERT_MAX // 2                # ... KV_MODE_EXPERT_IDX_MAX
_GATING_MAX_K = 1024
_EXPERT_TOKENS_MAX_EXPERTS = 2048                      # moe_compute_expert_tokens_tiling.cpp E_BOUND_NUM_UP_LIMIT
_EXPERT_TOKENS_MAX_ROWS = 1 << 24                      # ... BSK_BOUND_NUM_UP_LIMIT
_RE_ROUTING_MAX_H = 16384                              # moe_re_routing_membase_tiling.cpp TOKENS_LENGTH_UPPER_BOUND
_RE_ROUTING_TOKENS_DTYPES = (NPU_DTYPES["hifloat8"], NPU_DTYPES["float4_e2m1fn_x2"], NPU_DTYPES["float4_e1m2fn_x2"])
# quant modes whose expanded_x torch_npu allocates in a dtype aclnnMoeInitRoutingV3 refuses on A2 / A3
# (fp8 / hifloat8 / mxfp4 / int4 outputs: Ascend 950 only)
_V2_950_QUANT_MODES = (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17)


# ----------------------------------------------------------------------------- shared helpers

def _check_tensor(t: torch.Tensor | None, name: str, dim: int, dtypes: Sequence[torch.dtype],
                  dim_code: int = PARAM_INVALID) -> None:
    """A required tensor of ``dim`` dims and one of ``dtypes`` (dims: ``dim_code``, the code of
    the check that holds the op's rank rule; dtype: 161002)."""
    reject(t is not None, f"{name} must not be None", PARAM_NULLPTR)
    reject(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    reject(t.dim() == dim, f"{name} must be {dim}-D, got shape {tuple(t.shape)}", dim_code)
    reject(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def dynamic_quant_rows(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 over the last dim (init_routing_v2's quant_mode 1): scale =
    max|x| / 127, y = round(x / scale) in [-128, 127]; an all-zero row gives y 0 and scale 0.
    xf (..., H) fp32 -> (y (..., H) int8, scale (...) fp32)."""
    scale = xf.abs().amax(-1) / torch.tensor(127.0)
    y = torch.where(scale[..., None] > 0, xf / scale[..., None].clamp_min(1e-30), torch.zeros_like(xf))
    return y.round().clamp(-128, 127).to(torch.int8), scale


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


# ----------------------------------------------------------------------------- gating

def _gating_check(x: torch.Tensor, finished: torch.Tensor | None, k: int) -> None:
    """moe_gating_top_k_softmax_tiling_base.cpp (GetShapeAttrsInfo): x 2-D / 3-D without empty
    dims, finished bool of x's leading shape, 0 < k <= E and k <= 1024."""
    reject(isinstance(x, torch.Tensor) and x.dim() in (2, 3),
           f"x must be a 2-D or 3-D tensor, got {getattr(x, 'shape', type(x))}", TILING_ERROR)
    reject(x.dtype in _FLOATS, f"x dtype must be fp16/bf16/fp32, got {x.dtype}")
    reject(all(s > 0 for s in x.shape), f"x shape {tuple(x.shape)} contains zero", TILING_ERROR)
    E = x.shape[-1]
    reject(0 < k <= E, f"attr k(={k}) is wrong: it must satisfy 0 < k <= E (={E})", TILING_ERROR)
    reject(k <= _GATING_MAX_K, f"attr k(={k}) is too large (at most {_GATING_MAX_K})", TILING_ERROR)
    if finished is not None:
        reject(finished.dtype == torch.bool, f"finished dtype must be bool, got {finished.dtype}", TILING_ERROR)
        reject(finished.shape == x.shape[:-1],
               f"finished shape must be x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(finished.shape)}",
               TILING_ERROR)


def npu_moe_gating_top_k_softmax(x: torch.Tensor, finished: torch.Tensor | None = None,
                                 k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax over the experts (last dim, in fp32), then the top k.

    x (N, E) or (B, S, E) fp16/bf16/fp32; finished (N,) or (B, S) bool, optional: its True rows
    get expert id E (their y are still the softmax top k); 0 < k <= min(E, 1024).
    Returns y (..., k) x.dtype (descending; equal values keep the lower expert first),
    expert_idx (..., k) int32, and row_idx (..., k) int32 = j * R + r for row r of the R =
    N (or B * S) rows and its j-th choice, the (token, k) numbering ``npu_moe_init_routing``
    takes.
    """
    _gating_check(x, finished, k)
    E = x.shape[-1]
    probs = torch.softmax(x.float(), dim=-1)
    values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    y, expert_idx = values[..., :k].to(x.dtype), order[..., :k].to(torch.int32)
    if finished is not None:
        expert_idx = torch.where(finished[..., None], torch.tensor(E, dtype=torch.int32), expert_idx)
    rows = x[..., 0].numel()
    row_idx = torch.arange(rows * k, dtype=torch.int32).reshape(k, rows).t().reshape(*x.shape[:-1], k)
    return y, expert_idx, row_idx.contiguous()


# ----------------------------------------------------------------------------- init_routing (v1)

def _init_routing_check(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor, active_num: int) -> None:
    """moe_init_routing_tiling.cpp: x, row_idx, expert_idx 2-D, row_idx and expert_idx of one
    shape, x's rows theirs, active_num >= 0 (561002); dtypes (161002)."""
    _check_tensor(x, "x", 2, _FLOATS, TILING_ERROR)
    _check_tensor(row_idx, "row_idx", 2, (torch.int32,), TILING_ERROR)
    _check_tensor(expert_idx, "expert_idx", 2, (torch.int32,), TILING_ERROR)
    reject(row_idx.shape == expert_idx.shape,
           f"row_idx shape {tuple(row_idx.shape)} must equal expert_idx shape {tuple(expert_idx.shape)}", TILING_ERROR)
    reject(x.shape[0] == expert_idx.shape[0], f"x has {x.shape[0]} rows but expert_idx has {expert_idx.shape[0]}",
           TILING_ERROR)
    reject(isinstance(active_num, int) and active_num >= 0, f"active_num must be a non-negative number, got "
                                                            f"{active_num}", TILING_ERROR)


def npu_moe_init_routing(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor,
                         active_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N * K (token, choice) pairs by expert (stable: equal experts keep the row-major
    (token, choice) order) and expand x to that order.

    x (N, H) fp16/bf16/fp32; row_idx (N, K) int32, the pairs' ids in [0, N * K) (as
    ``npu_moe_gating_top_k_softmax`` gives: k * N + n); expert_idx (N, K) int32; active_num >= 0.
    Returns expanded_x (min(N, active_num) * K, H) x.dtype, row i = x[src_i % N] where src_i is
    the id of the i-th sorted pair; expanded_row_idx (N * K,) int32 with
    expanded_row_idx[src_i] = i (the gather index ``npu_moe_finalize_routing`` mode 0 takes);
    expanded_expert_idx (N * K,) int32, the sorted experts.  ids outside [0, N * K) (out of
    contract; the kernel scatters them out of bounds): their entries are not written.
    """
    _init_routing_check(x, row_idx, expert_idx, active_num)
    n, k = expert_idx.shape
    ids = row_idx.reshape(-1).long()
    inside = (ids >= 0) & (ids < n * k)
    tolerate(bool(inside.all()), f"npu_moe_init_routing: row_idx values must lie in [0, N * K = {n * k})")
    sorted_expert, order = torch.sort(expert_idx.reshape(-1), stable=True)
    dst_to_src = ids[order]
    expanded_row_idx = torch.full((n * k,), -1, dtype=torch.int32)
    kept = inside[order]
    expanded_row_idx[dst_to_src[kept]] = torch.arange(n * k, dtype=torch.int32)[kept]
    expanded_x = x[dst_to_src[:min(active_num, n) * k] % max(n, 1)]
    return expanded_x, expanded_row_idx, sorted_expert.to(torch.int32)


# ----------------------------------------------------------------------------- init_routing_v2

@dataclass(frozen=True)
class _V2:
    """One npu_moe_init_routing_v2 call after torch_npu's adapter: x as the kernel reads it
    (``x_dtype`` applied), the active range [start, end) and the attributes the kernel uses."""

    x: torch.Tensor
    expert_idx: torch.Tensor
    scale: torch.Tensor | None
    start: int
    end: int
    expert_num: int
    expert_tokens_num_type: int
    quant_mode: int
    row_idx_type: int

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def k(self) -> int:
        return self.expert_idx.shape[1]


def _v2_range(active_expert_range: Sequence[int], expert_num: int) -> tuple[int, int]:
    """torch_npu's adapter: [] means [0, expert_num]; the list must then have 2 entries."""
    values = [int(v) for v in active_expert_range] if len(active_expert_range) else [0, expert_num]
    reject(len(values) == 2, f"The length of list active_expert_range should be 2, current is {len(values)}.")
    return values[0], values[1]


def _v2_x(x: torch.Tensor, x_dtype: int | None, quant_mode: int) -> torch.Tensor:
    """x as the kernel reads it: with quant_mode -1 torch_npu relabels x's memory as ``x_dtype``
    (a torch_npu or ScalarType code); aclnnMoeInitRoutingV3 on A2 / A3 takes fp16 / bf16 / fp32 /
    int8 x only (hifloat8, fp8 and fp4 x are Ascend 950's)."""
    if x_dtype is None or quant_mode != -1:
        return x
    want = torch_dtype(x_dtype)
    reject(want in _V2_X_DTYPES, f"aclnnMoeInitRoutingV3: x dtype {dtype_name(x_dtype)} (x_dtype) is not supported on "
                                 f"Atlas A2 / A3: x must be float16, bfloat16, float32 or int8")
    reject(want.itemsize == x.element_size(), f"x_dtype {dtype_name(x_dtype)} relabels x ({x.dtype}) as a dtype of "
                                              f"another element size")
    return x.view(want)


def _v2_aclnn_checks(c: _V2, offset: torch.Tensor | None) -> None:
    """aclnn_moe_init_routing_v3.cpp (CheckDtypeValid, CheckShape): 161002."""
    reject(c.x.dtype in _V2_X_DTYPES, f"aclnnMoeInitRoutingV3: x dtype {c.x.dtype} is not supported: float16, "
                                      f"bfloat16, float32 or int8")
    reject(c.expert_idx.dtype == torch.int32, f"aclnnMoeInitRoutingV3: expert_idx dtype must be int32, got "
                                              f"{c.expert_idx.dtype}")
    for name, t in (("scale", c.scale), ("offset", offset)):
        reject(t is None or t.dtype == torch.float32, f"aclnnMoeInitRoutingV3: {name} dtype must be float32, got "
                                                      f"{getattr(t, 'dtype', None)}")
    reject(c.quant_mode not in _V2_950_QUANT_MODES,
           f"aclnnMoeInitRoutingV3: quant_mode={c.quant_mode} gives an expanded_x dtype (fp8 / hifloat8 / mxfp4 / "
           f"int4) that Atlas A2 / A3 do not support")
    reject(c.expert_idx.shape[0] == c.n, "aclnnMoeInitRoutingV3: expertIdx shape error: its rows must be x's")
    if c.scale is not None and c.quant_mode == -1:
        reject(c.scale.dim() == 1 and c.scale.shape[0] == c.n,
               f"aclnnMoeInitRoutingV3: scale shape error: (N={c.n},) without quantisation, got {tuple(c.scale.shape)}")
    if c.scale is not None and c.quant_mode == 1:
        reject(c.scale.dim() == 2 and tuple(c.scale.shape) == (c.end - c.start, c.x.shape[1]),
               f"aclnnMoeInitRoutingV3: scale shape error: (expert_end - expert_start = {c.end - c.start}, "
               f"H = {c.x.shape[1]}) in dynamic quant, got {tuple(c.scale.shape)}")


def _v2_tiling_checks(c: _V2, active_num: int, drop_pad_mode: int, expert_tokens_num_flag: bool) -> None:
    """moe_init_routing_v3_tiling.cpp, CheckAttr then CheckInputShape (lines 233-352 at
    hicann/ops-transformer c29bc10): 561002."""
    reject(active_num >= -1, "active_num should be greater than or equal to -1", TILING_ERROR)
    reject(c.expert_num > 0, "expert_num should be greater than 0", TILING_ERROR)
    reject(drop_pad_mode == 0, "drop_pad_mode currently support 0", TILING_ERROR)
    reject(c.expert_tokens_num_type in (1, 2), f"expert_tokens_num_type currently not support "
                                               f"{c.expert_tokens_num_type}", TILING_ERROR)
    reject(bool(expert_tokens_num_flag), "expert_tokens_num_flag currently support True", TILING_ERROR)
    reject(c.start >= 0, "expert_start should be greater than or equal to 0", TILING_ERROR)
    reject(c.start < c.end, "expert_start should be less than expert_end", TILING_ERROR)
    reject(c.end <= c.expert_num, f"expert_end should be less than or equal to {c.expert_num}", TILING_ERROR)
    most = _V2_KV_EXPERT_MAX if c.expert_tokens_num_type == 2 else _V2_EXPERT_MAX
    reject(c.end <= most, f"expert_end should be less than or equal to {most}"
                          f"{' in KEY_VALUE mode' if c.expert_tokens_num_type == 2 else ''}", TILING_ERROR)
    reject(c.quant_mode in (-1, 1), "quant_mode currently support -1 or 1", TILING_ERROR)
    reject(c.row_idx_type in (0, 1), "row_idx_type currently support 1 or 0", TILING_ERROR)
    total = c.n * c.k
    reject(active_num == -1 or active_num == total, f"active_num currently should equal to {total}(bs*k)",
           TILING_ERROR)


def _v2_prepare(x: torch.Tensor, expert_idx: torch.Tensor, args: dict) -> _V2:
    """torch_npu's adapter (MoeInitRoutingV2KernelNpuOpApi.cpp: x and expert_idx 2-D, the range,
    quant 1 is int8 only) and ``x_dtype``; the aclnn and tiling checks unless x is empty (the
    adapter returns at once then)."""
    reject(isinstance(x, torch.Tensor) and x.dim() == 2, f"The x should be 2-Dimension, current is "
                                                         f"{getattr(x, 'dim', lambda: '?')()}-Dimension.")
    reject(isinstance(expert_idx, torch.Tensor) and expert_idx.dim() == 2,
           f"The expert_idx should be 2-Dimension, current is {getattr(expert_idx, 'dim', lambda: '?')()}-Dimension.")
    start, end = _v2_range(args["active_expert_range"], args["expert_num"])
    reject(not (args["quant_mode"] == 1 and args["x_dtype"] == NPU_DTYPES["int4"]),
           "INT4 dynamic quantization uses quant_mode=13. quant_mode=1 only supports INT8 dynamic quantization.")
    c = _V2(_v2_x(x, args["x_dtype"], args["quant_mode"]), expert_idx, args["scale"], start, end,
            args["expert_num"], args["expert_tokens_num_type"], args["quant_mode"], args["row_idx_type"])
    if c.n == 0:
        return c
    _v2_aclnn_checks(c, args["offset"])
    _v2_tiling_checks(c, args["active_num"], args["drop_pad_mode"], args["expert_tokens_num_flag"])
    return c


def _v2_order(c: _V2) -> tuple[torch.Tensor, int]:
    """The kernel's sort (moe_v3_sort_one_core.h): every pair p = n * K + k keyed by its expert,
    experts below the range keyed last (as one value), stably.  Returns the order (N * K,) int64
    and the number of pairs in the range (they come first)."""
    experts = c.expert_idx.reshape(-1).long()
    keys = torch.where(experts < c.start, torch.iinfo(torch.int64).max, experts)
    order = torch.sort(keys, stable=True).indices
    return order, int(((experts >= c.start) & (experts < c.end)).sum())


def _v2_tokens(c: _V2, counts: torch.Tensor) -> torch.Tensor:
    """expert_tokens int64: counts over the range (type 1, (end - start,)) or (expert_num, 2) rows
    [expert, count] of the range's non-empty experts, then zeros (type 2)."""
    if c.expert_tokens_num_type != 2:
        return counts
    present = torch.nonzero(counts).flatten()
    out = torch.zeros((c.expert_num, 2), dtype=torch.int64)
    out[:present.numel(), 0] = present + c.start
    out[:present.numel(), 1] = counts[present]
    return out


def _v2_empty(c: _V2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """N = 0: the adapter's outputs, expert_tokens zeroed, no kernel run."""
    dtype = torch.int8 if c.quant_mode in (0, 1) else c.x.dtype
    tokens = torch.zeros((c.expert_num, 2) if c.expert_tokens_num_type == 2 else (c.end - c.start,),
                         dtype=torch.int64)
    return (c.x.new_empty((0, c.x.shape[1]), dtype=dtype), torch.empty(0, dtype=torch.int32), tokens,
            torch.empty(0, dtype=torch.float32))


def _v2_contract(c: _V2, offset: torch.Tensor | None) -> None:
    """What the kernel accepts against the docs: expert ids in [0, expert_num), no offset, int8 x
    without quantisation (the docs: a quantised int8 x gives meaningless output)."""
    experts = c.expert_idx
    tolerate(bool(((experts >= 0) & (experts < c.expert_num)).all()),
             f"npu_moe_init_routing_v2: expert_idx values must lie in [0, expert_num={c.expert_num}) (the kernel "
             f"leaves the others out of the range)")
    tolerate(offset is None, f"npu_moe_init_routing_v2: offset is not taken with quant_mode={c.quant_mode} (the kernel "
                             f"ignores it)")
    tolerate(not (c.quant_mode == 1 and c.x.dtype == torch.int8),
             "npu_moe_init_routing_v2: int8 x with quant_mode=1 (the docs: the output is meaningless; here its "
             "values are quantised)")


def npu_moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: torch.Tensor | None = None,
                            offset: torch.Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: Sequence[int] = [],  # torch_npu's default; never mutated
                            row_idx_type: int = 0, x_dtype: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N * K (token, choice) pairs by expert (pair id p = n * K + k, stable), expand x to
    that order and optionally quantise it: the pairs whose expert lies in the active range
    [start, end) (``active_expert_range``, default [0, expert_num)) come first.

    x (N, H) fp16/bf16/fp32/int8 (``x_dtype``: torch_npu relabels x's memory with quant -1);
    expert_idx (N, K) int32; scale: quant -1 (N,) fp32 (gathered into expanded_scale), quant 1
    (end - start, H) fp32 smooth scale per expert.  The A2 / A3 tiling takes drop_pad_mode 0,
    active_num -1 or N * K, expert_tokens_num_type 1 / 2 with expert_tokens_num_flag True and
    quant_mode -1 / 1 only (561002 otherwise; expert_capacity is not read).
    Returns:
      expanded_x (N * K, H): row i = x[order_i // K] for the ``available`` pairs in the range,
        zero rows after.  x.dtype, or int8 for quant 1.
      expanded_row_idx (N * K,) int32: gather (row_idx_type 0: [pair id] -> row, -1 outside the
        range) or scatter (1: the kernel's whole sort order, the range's pairs first, then those
        of experts past the range by expert, then those below it).
      expert_tokens (int64): (end - start,) counts, or (expert_num, 2) key-value rows [expert,
        count] of the non-empty experts then zeros.
      expanded_scale (N * K,) fp32: the dynamic scales (quant 1), gathered ``scale`` or zeros
        (quant -1).
    N = 0: empty outputs and zero counts, whatever the scale (the adapter returns before aclnn).
    """
    c = _v2_prepare(x, expert_idx, locals())
    if c.n == 0:
        return _v2_empty(c)
    _v2_contract(c, offset)
    order, available = _v2_order(c)
    nk = c.n * c.k
    filled = torch.arange(nk) < available
    src_row = order // c.k
    if c.row_idx_type == 1:
        expanded_row_idx = order.to(torch.int32)
    else:
        expanded_row_idx = torch.full((nk,), -1, dtype=torch.int32)
        expanded_row_idx[order[:available]] = torch.arange(available, dtype=torch.int32)
    gathered = torch.where(filled[:, None], c.x[src_row], torch.zeros((), dtype=c.x.dtype))
    sorted_experts = c.expert_idx.reshape(-1).long()[order[:available]]
    counts = torch.bincount(sorted_experts - c.start, minlength=c.end - c.start)
    if c.quant_mode == 1:
        xf = gathered.float()
        if c.scale is not None:
            smooth = c.scale[torch.where(filled, c.expert_idx.reshape(-1).long()[order] - c.start, 0)]
            xf = torch.where(filled[:, None], xf * smooth, xf)
        expanded_x, expanded_scale = dynamic_quant_rows(xf)
    else:
        expanded_x = gathered
        expanded_scale = torch.zeros(nk, dtype=torch.float32)
        if c.scale is not None:
            expanded_scale = torch.where(filled, c.scale[src_row], expanded_scale)
    return expanded_x, expanded_row_idx, _v2_tokens(c, counts), expanded_scale


# ----------------------------------------------------------------------------- finalize_routing

def _finalize_index(expanded_src_to_dst_row: torch.Tensor, mode: int, num_rows: int, k: int,
                    num_slots: int) -> torch.Tensor:
    """(num_rows, k) int64 rows of expanded_permuted_rows (-1 = dropped) from the (N * K,) index:
    column layout [k * N + n] (modes 0, 1) or row layout [n * K + k] (modes 2, 3).  Values
    outside [-1, slots) (out of contract: the kernel reads past the rows) read as dropped."""
    idx = expanded_src_to_dst_row.long()
    inside = (idx >= -1) & (idx < num_slots)
    if tolerate(bool(inside.all()), f"npu_moe_finalize_routing: expanded_src_to_dst_row values must lie in "
                                    f"[-1, {num_slots})"):
        idx = torch.where(inside, idx, -1)
    return idx.reshape(k, num_rows).t() if mode in (0, 1) else idx.reshape(num_rows, k)


def _finalize_check(rows: torch.Tensor, skips: tuple[torch.Tensor | None, torch.Tensor | None],
                    scales: torch.Tensor | None, mode: int, index: torch.Tensor, k: int) -> tuple[int, int]:
    """moe_finalize_routing_v2_tiling_membase.cpp (GetShapeAttrsInfo): the mode, the index 1-D,
    scales 2-D with K > 0, rows 2-D (modes 0 / 2) or 3-D (1 / 3), skip1 / skip2 (N, H) and skip2
    only with skip1 (561002); dtypes (161002).  K: scales' columns, else ``k`` (torch_npu passes
    it to aclnnMoeFinalizeRoutingV4).  Returns (N, K)."""
    reject(mode in (0, 1, 2, 3), "the value of drop_pad_mode should be [0,3].", TILING_ERROR)
    _check_tensor(index, "expanded_src_to_dst_row", 1, (torch.int32,), TILING_ERROR)
    reject(k > 0, f"k must be > 0, got {k}")
    if scales is not None:
        _check_tensor(scales, "scales", 2, _FLOATS, TILING_ERROR)
        k = scales.shape[1]
        reject(k > 0, "K can not be 0.", TILING_ERROR)
    _check_tensor(rows, "expanded_permuted_rows", 3 if mode in (1, 3) else 2, _FLOATS, TILING_ERROR)
    num_rows = index.numel() // k
    skip1, skip2 = skips
    reject(skip1 is not None or skip2 is None,
           "In the case of x1 parameter is not input, x2 parameter can't be inputted either.", TILING_ERROR)
    for name, t in (("skip1", skip1), ("skip2", skip2)):
        if t is not None:
            _check_tensor(t, name, 2, (rows.dtype,), TILING_ERROR)
            reject(tuple(t.shape) == (num_rows, rows.shape[-1]),
                   f"{name} must be (N={num_rows}, H={rows.shape[-1]}), got {tuple(t.shape)}", TILING_ERROR)
    return num_rows, k


def _finalize_bias(bias: torch.Tensor, experts: torch.Tensor | None, rows: torch.Tensor, mode: int,
                   shape: tuple[int, int]) -> None:
    """The bias checks of the same tiling: expert ids needed, bias (E, H) with E >= K > 0 (E the
    rows' expert count in modes 1 / 3), expert ids (N, K)."""
    reject(experts is not None, "the expert_idx must exist when bias exist.", TILING_ERROR)
    _check_tensor(bias, "bias", 2, (rows.dtype,), TILING_ERROR)
    if mode in (1, 3):
        reject(bias.shape[0] == rows.shape[0], f"the dim 0 of bias should be {rows.shape[0]} when drop_pad_mode is "
                                               f"1 or 3.", TILING_ERROR)
    reject(bias.shape[1] == rows.shape[-1], f"the dim 1 of bias should be {rows.shape[-1]}.", TILING_ERROR)
    _check_tensor(experts, "export_for_source_row", 2, (torch.int32,), TILING_ERROR)
    reject(tuple(experts.shape) == shape, f"export_for_source_row must be (N={shape[0]}, K={shape[1]}), got "
                                          f"{tuple(experts.shape)}", TILING_ERROR)
    reject(bias.shape[0] >= shape[1], "E should be larger than or equal to K.", TILING_ERROR)
    reject(bias.shape[0] > 0, "E can not be 0.", TILING_ERROR)


def npu_moe_finalize_routing(expanded_permuted_rows: torch.Tensor, skip1: torch.Tensor | None,
                             skip2: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor | None,
                             expanded_src_to_dst_row: torch.Tensor, export_for_source_row: torch.Tensor | None,
                             drop_pad_mode: int | None = 0, k: int | None = 1) -> torch.Tensor:
    """out[n] = skip1[n] + skip2[n] + sum_j scales[n, j] * (rows[dst(n, j)] + bias[expert(n, j)]),
    computed in fp32; a dst of -1 (a dropped slot) reads a zero row (bias still added).

    expanded_permuted_rows (N * K, H) (drop_pad_mode 0 / 2) or (E, C, H) (1 / 3), fp16/bf16/fp32;
    skip1, skip2 (N, H) same dtype, optional (skip2 needs skip1); bias (E, H) optional;
    scales (N, K) optional (absent: weight 1 and K = ``k``); expanded_src_to_dst_row
    (N * K,) int32, dst(n, j) at [j * N + n] for modes 0 / 1 (``npu_moe_init_routing``'s
    expanded_row_idx) and at [n * K + j] for modes 2 / 3 (``npu_moe_init_routing_v2``'s gather
    index); export_for_source_row (N, K) int32 expert ids, needed with bias.
    Returns out (N, H) in expanded_permuted_rows' dtype.
    """
    mode = 0 if drop_pad_mode is None else drop_pad_mode
    num_rows, kk = _finalize_check(expanded_permuted_rows, (skip1, skip2), scales, mode, expanded_src_to_dst_row,
                                   1 if k is None else k)
    nk = expanded_src_to_dst_row.numel()
    tolerate(nk == num_rows * kk, f"npu_moe_finalize_routing: expanded_src_to_dst_row has {nk} entries, not a "
                                  f"multiple of K = {kk} (the kernel reads N = {num_rows} rows of K)")
    H = expanded_permuted_rows.shape[-1]
    flat = expanded_permuted_rows.reshape(-1, H).float()
    dst = _finalize_index(expanded_src_to_dst_row[:num_rows * kk], mode, num_rows, kk, flat.shape[0])
    picked = torch.where((dst >= 0)[..., None], flat[dst.clamp_min(0)], torch.zeros(()))
    if bias is not None:
        _finalize_bias(bias, export_for_source_row, expanded_permuted_rows, mode, (num_rows, kk))
        picked = picked + bias.float()[export_for_source_row.long()]
    if scales is not None:
        reject(scales.shape[0] == num_rows, f"scales must have N = {num_rows} rows, got {scales.shape[0]}",
               TILING_ERROR)
        picked = picked * scales.float()[..., None]
    out = picked.sum(1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(expanded_permuted_rows.dtype)


# ----------------------------------------------------------------------------- expert tokens

def _compute_expert_tokens_check(s: torch.Tensor, num_expert: int) -> None:
    """moe_compute_expert_tokens_tiling.cpp: 1-D int32, at most 2^24 entries, 0 < num_expert <= 2048."""
    _check_tensor(s, "sorted_expert_for_source_row", 1, (torch.int32,), TILING_ERROR)
    reject(s.numel() <= _EXPERT_TOKENS_MAX_ROWS, "Number of sorted expert should not larger than 2**24",
           TILING_ERROR)
    reject(0 < num_expert <= _EXPERT_TOKENS_MAX_EXPERTS,
           f"num_expert must lie in (0, {_EXPERT_TOKENS_MAX_EXPERTS}], got {num_expert}", TILING_ERROR)


def npu_moe_compute_expert_tokens(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> torch.Tensor:
    """For each expert e < num_expert, the end of its run in the sorted list: the number of
    entries <= e (a binary search).

    sorted_expert_for_source_row (M,) int32, non-decreasing, values in [0, num_expert);
    0 < num_expert <= 2048.  Returns (num_expert,) int32.  An unsorted list (out of contract)
    gets the binary search's answer all the same.
    """
    s = sorted_expert_for_source_row
    _compute_expert_tokens_check(s, num_expert)
    tolerate(bool((s[1:] >= s[:-1]).all()), "npu_moe_compute_expert_tokens: sorted_expert_for_source_row must be "
                                            "non-decreasing (the kernel binary-searches it)")
    experts = torch.arange(num_expert, dtype=torch.int32)
    return torch.searchsorted(s.contiguous(), experts, right=True).to(torch.int32)


# ----------------------------------------------------------------------------- re_routing

def _re_routing_index(counts: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The A2 / A3 kernel's walk (moe_re_routing.h): block (rank i, expert j) of counts[i, j] rows
    is read from src = the sum of the counts before it rank-major and written to dst = the sum
    before it expert-major (negative counts move those sums and copy nothing).  Returns
    (dst, src) int64 of every row copied whose dst and src lie in [0, tokens) (the device would
    write / read the others out of bounds)."""
    n, e = counts.shape
    flat = counts.reshape(-1)
    src_start = _exclusive_cumsum(flat)
    dst_start = _exclusive_cumsum(counts.t().reshape(-1)).reshape(e, n).t().reshape(-1)
    sizes = flat.clamp_min(0)
    block = torch.repeat_interleave(torch.arange(n * e), sizes)
    within = torch.arange(int(sizes.sum())) - _exclusive_cumsum(sizes)[block]
    src, dst = src_start[block] + within, dst_start[block] + within
    keep = (src >= 0) & (src < tokens) & (dst >= 0) & (dst < tokens)
    return dst[keep], src[keep]


def _re_routing_check(tokens: torch.Tensor, counts: torch.Tensor, per_token_scales: torch.Tensor | None,
                      modes: tuple[int, int, int | None]) -> None:
    """torch_npu's adapter (MoeReRoutingOpApi.cpp: dims, tokens_dtype), then the A2 / A3 tiling
    (moe_re_routing_membase_tiling.cpp: 2-D shapes, H <= 16384, count mode 1, gather index 0,
    a kernel for the tokens / counts dtypes)."""
    expert_token_num_type, idx_type, tokens_dtype = modes
    reject(isinstance(tokens, torch.Tensor) and tokens.dim() > 1, "tokens dim should larger than 1")
    reject(isinstance(counts, torch.Tensor) and counts.dim() > 1, "expert_token_num_per_rank dim should larger than 1")
    reject(tokens_dtype is None or int(tokens_dtype) in _RE_ROUTING_TOKENS_DTYPES,
           f"The optional parameter tokens_dtype only supports hifloat8, float4_e2m1fn_x2, float4_e1m2fn_x2 or None, "
           f"but now is {dtype_name(tokens_dtype)}.")
    reject(tokens.dim() == 2 and counts.dim() == 2, f"Shape must be 2D: tokens {tuple(tokens.shape)}, "
                                                    f"expert_token_num_per_rank {tuple(counts.shape)}", TILING_ERROR)
    reject(tokens.shape[1] <= _RE_ROUTING_MAX_H, f"tokenSize should <= {_RE_ROUTING_MAX_H}.", TILING_ERROR)
    reject(expert_token_num_type == 1, "expertTokenNumType should == 1.", TILING_ERROR)
    reject(idx_type == 0, "idxType should == 0.", TILING_ERROR)
    reject(tokens_dtype is None and tokens.dtype in (torch.int8, torch.float16, torch.bfloat16)
           and counts.dtype in (torch.int32, torch.int64),
           f"Failed to find tilingkey: no A2 / A3 kernel for tokens "
           f"{dtype_name(tokens_dtype) if tokens_dtype is not None else tokens.dtype} and expert_token_num_per_rank "
           f"{counts.dtype}", TILING_ERROR)
    if per_token_scales is not None:
        _check_tensor(per_token_scales, "per_token_scales", 1, (torch.float32,))
        reject(per_token_scales.shape[0] == tokens.shape[0],
               f"per_token_scales must be (A={tokens.shape[0]},), got {tuple(per_token_scales.shape)}")


def npu_moe_re_routing(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
                       per_token_scales: torch.Tensor | None = None, expert_token_num_type: int = 1,
                       idx_type: int = 0, tokens_dtype: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder tokens received rank-major into expert-major order.

    tokens (A, H) fp16/bf16/int8 (H <= 16384); expert_token_num_per_rank (N, E) int32/int64,
    [i, j] = tokens from rank i for local expert j; per_token_scales (A,) fp32, optional.
    The docs want sum(counts) = A and counts >= 0; the kernel does not check: it copies each
    (rank, expert) block by the running sums of the counts, and rows whose place falls outside
    [0, A) are not copied (out of contract: a ContractWarning).
    Returns permute_tokens (A, H) tokens.dtype; permute_per_token_scales (A,) (per_token_scales
    reordered, else zeros fp32); permute_token_idx (A,) int32, the gather index
    (permute_tokens[i] = tokens[permute_token_idx[i]]; -1 and zero rows where nothing was
    copied); expert_token_num (E,) = the counts summed over ranks (count mode, the dtype of
    expert_token_num_per_rank).  tokens_dtype (hifloat8 / float4 tokens) and idx_type 1 are
    Ascend 950's: the A2 / A3 tiling rejects them (561002).
    """
    counts = expert_token_num_per_rank
    _re_routing_check(tokens, counts, per_token_scales, (expert_token_num_type, idx_type, tokens_dtype))
    a = tokens.shape[0]
    tolerate(bool((counts >= 0).all()) and int(counts.sum()) == a,
             f"npu_moe_re_routing: expert_token_num_per_rank must be >= 0 and sum to the {a} tokens, its sum is "
             f"{int(counts.sum())} (the kernel copies the blocks that fit and leaves the other rows unwritten)")
    dst, src = _re_routing_index(counts.long(), a)
    index = torch.full((a,), -1, dtype=torch.int32)
    index[dst] = src.to(torch.int32)
    out = tokens.new_zeros(tokens.shape)
    out[dst] = tokens[src]
    scales = torch.zeros(a, dtype=torch.float32 if per_token_scales is None else per_token_scales.dtype)
    if per_token_scales is not None:
        scales[dst] = per_token_scales[src]
    return out, scales, index, counts.sum(0).to(counts.dtype)


# ----------------------------------------------------------------------------- fake kernels
# Output shapes and dtypes only (graph capture, FakeTensorMode, meta tensors), as the kernels
# allocate them; the argument checks that need no data are the kernels' own.

def _gating_fake(x: torch.Tensor, finished: torch.Tensor | None = None,
                 k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _gating_check(x, finished, k)
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32), x.new_empty(shape, dtype=torch.int32)


def _init_routing_fake(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor,
                       active_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _init_routing_check(x, row_idx, expert_idx, active_num)
    n, k = expert_idx.shape
    return (x.new_empty((min(n, active_num) * k, x.shape[1])), row_idx.new_empty((n * k,)),
            row_idx.new_empty((n * k,)))


def _init_routing_v2_fake(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: torch.Tensor | None = None,
                          offset: torch.Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                          expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                          expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                          active_expert_range: Sequence[int] = [], row_idx_type: int = 0, x_dtype: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's shapes (torch_npu's meta function gives the same for every call the A2 / A3
    tiling takes; for an empty x without expert_tokens_num_flag it gives a 0-dim expert_tokens,
    the eager adapter (end - start,) as here)."""
    c = _v2_prepare(x, expert_idx, locals())
    nk = c.n * c.k
    tokens = (c.expert_num, 2) if c.expert_tokens_num_type == 2 else (c.end - c.start,)
    return (x.new_empty((nk, x.shape[1]), dtype=torch.int8 if c.quant_mode in (0, 1) else c.x.dtype),
            x.new_empty((nk,), dtype=torch.int32), x.new_empty(tokens, dtype=torch.int64),
            x.new_empty((nk,), dtype=torch.float32))


def _finalize_routing_fake(expanded_permuted_rows: torch.Tensor, skip1: torch.Tensor | None,
                           skip2: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor | None,
                           expanded_src_to_dst_row: torch.Tensor, export_for_source_row: torch.Tensor | None,
                           drop_pad_mode: int | None = 0, k: int | None = 1) -> torch.Tensor:
    mode = 0 if drop_pad_mode is None else drop_pad_mode
    rows, _ = _finalize_check(expanded_permuted_rows, (skip1, skip2), scales, mode, expanded_src_to_dst_row,
                              1 if k is None else k)
    return expanded_permuted_rows.new_empty((rows, expanded_permuted_rows.shape[-1]))


def _compute_expert_tokens_fake(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> torch.Tensor:
    _compute_expert_tokens_check(sorted_expert_for_source_row, num_expert)
    return sorted_expert_for_source_row.new_empty((num_expert,), dtype=torch.int32)


def _re_routing_fake(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
                     per_token_scales: torch.Tensor | None = None, expert_token_num_type: int = 1,
                     idx_type: int = 0, tokens_dtype: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _re_routing_check(tokens, expert_token_num_per_rank, per_token_scales,
                      (expert_token_num_type, idx_type, tokens_dtype))
    a = tokens.shape[0]
    scales = (per_token_scales.new_empty(per_token_scales.shape) if per_token_scales is not None
              else tokens.new_empty((a,), dtype=torch.float32))
    return (tokens.new_empty(tokens.shape), scales, tokens.new_empty((a,), dtype=torch.int32),
            expert_token_num_per_rank.new_empty((expert_token_num_per_rank.shape[1],)))


#: schema name -> (kernel on CPU tensors, fake kernel), for :mod:`emu.npu.registry`.
KERNELS = {
    "npu_moe_gating_top_k_softmax": (npu_moe_gating_top_k_softmax, _gating_fake),
    "npu_moe_init_routing": (npu_moe_init_routing, _init_routing_fake),
    "npu_moe_init_routing_v2": (npu_moe_init_routing_v2, _init_routing_v2_fake),
    "npu_moe_finalize_routing": (npu_moe_finalize_routing, _finalize_routing_fake),
    "npu_moe_compute_expert_tokens": (npu_moe_compute_expert_tokens, _compute_expert_tokens_fake),
    "npu_moe_re_routing": (npu_moe_re_routing, _re_routing_fake),
}
