"""torch_npu's MoE routing operators on the CPU, with torch_npu 2.14.0's signatures.

These follow torch_npu's public docs (the ``torch_npu.npu_moe_*`` API pages) and take plain CPU
tensors; outputs have the shapes and dtypes torch_npu's meta functions (graph mode) allocate.
Where torch_npu's eager allocation differs, the meta shape is kept: ``npu_moe_init_routing_v2``
gives a 0-dim expert_tokens without ``expert_tokens_num_flag`` and a 0-dim expanded_scale for
``quant_mode`` 0 (eager: (end - start,) or (expert_num, 2), and (rows,); contents unused).

Emulated:

* ``npu_moe_gating_top_k_softmax``: softmax over experts in fp32, top-k (ties: the lower expert
  first), ``finished`` rows get expert id E; row_idx in k-major order.
* ``npu_moe_init_routing``: stable sort of the (token, k) pairs by expert; gather index, rows.
* ``npu_moe_init_routing_v2``: dropless (``drop_pad_mode`` 0, with ``active_num``) and drop/pad
  (1, ``expert_capacity``); ``quant_mode`` -1 (none), 0 (static int8, computed in fp16 as the
  docs specify) and 1 (dynamic int8 per row, optional per-expert smooth scale);
  ``expert_tokens_num_type`` 0 (cumsum), 1 (count), 2 (key-value); ``row_idx_type`` 0 (gather)
  and 1 (scatter); ``active_expert_range``.
* ``npu_moe_finalize_routing``: all four ``drop_pad_mode`` s (column / row index layout, -1 = a
  dropped slot, read as a zero row).
* ``npu_moe_compute_expert_tokens``: per expert, the end of its run in the sorted list.
* ``npu_moe_re_routing``: rank-major tokens to expert-major, count mode, gather index.

Not emulated (``NotImplementedError`` naming the mode): ``npu_moe_init_routing_v2`` quant modes
other than -1/0/1 (MXFP8, HIF8, MXFP4, FP8 per-block, INT4), ``x_dtype``, drop/pad with
``expert_tokens_num_type`` other than 1; ``npu_moe_re_routing`` with ``expert_token_num_type``
0, ``idx_type`` 1 or ``tokens_dtype`` (torch_npu documents only 1 / 0 / None as supported).
Entries the docs call "uninitialised" or "meaningless" are filled deterministically: -1 for
indices, 0 for rows, scales and counts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["npu_moe_compute_expert_tokens", "npu_moe_finalize_routing", "npu_moe_gating_top_k_softmax",
           "npu_moe_init_routing", "npu_moe_init_routing_v2", "npu_moe_re_routing"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_V2_QUANT_MODES = (-1, 0, 1)
_V2_ALL_QUANT_MODES = (-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17)


# ----------------------------------------------------------------------------- shared helpers

def _require(ok: bool, message: str, error: type[Exception] = ValueError) -> None:
    if not ok:
        raise error(message)


def _check_tensor(t: torch.Tensor, name: str, dim: int, dtypes: Sequence[torch.dtype]) -> None:
    _require(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    _require(t.dim() == dim, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    _require(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


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
    _require(isinstance(x, torch.Tensor) and x.dim() in (2, 3),
             f"x must be a 2-D or 3-D tensor, got {getattr(x, 'shape', type(x))}")
    _require(x.dtype in _FLOATS, f"x dtype must be fp16/bf16/fp32, got {x.dtype}")
    E = x.shape[-1]
    _require(0 < k <= min(E, 1024), f"k must satisfy 0 < k <= min(E={E}, 1024), got {k}")
    if finished is not None:
        _check_tensor(finished, "finished", x.dim() - 1, (torch.bool,))
        _require(finished.shape == x.shape[:-1],
                 f"finished shape must be x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(finished.shape)}")
    probs = torch.softmax(x.float(), dim=-1)
    values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    y, expert_idx = values[..., :k].to(x.dtype), order[..., :k].to(torch.int32)
    if finished is not None:
        expert_idx = torch.where(finished[..., None], torch.tensor(E, dtype=torch.int32), expert_idx)
    rows = x[..., 0].numel()
    row_idx = torch.arange(rows * k, dtype=torch.int32).reshape(k, rows).t().reshape(*x.shape[:-1], k)
    return y, expert_idx, row_idx.contiguous()


# ----------------------------------------------------------------------------- init_routing (v1)

def npu_moe_init_routing(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor,
                         active_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N * K (token, choice) pairs by expert (stable: equal experts keep the row-major
    (token, choice) order) and expand x to that order.

    x (N, H) fp16/bf16/fp32; row_idx (N, K) int32, the pairs' ids in [0, N * K) (as
    ``npu_moe_gating_top_k_softmax`` gives: k * N + n); expert_idx (N, K) int32; active_num >= 0.
    Returns expanded_x (min(N, active_num) * K, H) x.dtype, row i = x[src_i % N] where src_i is
    the id of the i-th sorted pair; expanded_row_idx (N * K,) int32 with
    expanded_row_idx[src_i] = i (the gather index ``npu_moe_finalize_routing`` mode 0 takes);
    expanded_expert_idx (N * K,) int32, the sorted experts.
    """
    _check_tensor(x, "x", 2, _FLOATS)
    _check_tensor(expert_idx, "expert_idx", 2, (torch.int32,))
    _check_tensor(row_idx, "row_idx", 2, (torch.int32,))
    _require(row_idx.shape == expert_idx.shape,
             f"row_idx shape {tuple(row_idx.shape)} must equal expert_idx shape {tuple(expert_idx.shape)}")
    _require(x.shape[0] == expert_idx.shape[0],
             f"x has {x.shape[0]} rows but expert_idx has {expert_idx.shape[0]}")
    _require(isinstance(active_num, int) and active_num >= 0, f"active_num must be an int >= 0, got {active_num}")
    n, k = expert_idx.shape
    ids = row_idx.reshape(-1).long()
    _require(ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < n * k),
             f"row_idx values must lie in [0, N * K = {n * k})")
    sorted_expert, order = torch.sort(expert_idx.reshape(-1), stable=True)
    dst_to_src = ids[order]
    expanded_row_idx = torch.full((n * k,), -1, dtype=torch.int32)
    expanded_row_idx[dst_to_src] = torch.arange(n * k, dtype=torch.int32)
    expanded_x = x[dst_to_src[:min(active_num, n) * k] % max(n, 1)]
    return expanded_x, expanded_row_idx, sorted_expert.to(torch.int32)


# ----------------------------------------------------------------------------- init_routing_v2

@dataclass(frozen=True)
class _Route:
    """The (token, choice) pairs of expert_idx (N, K) in routed order: the ``available`` pairs
    whose expert lies in [start, end), sorted by (expert, row-major pair id)."""
    n: int
    k: int
    start: int
    end: int
    experts: torch.Tensor      # (N * K,) int64, expert_idx flattened row-major
    order: torch.Tensor        # (available,) int64, pair ids in routed order
    sorted_expert: torch.Tensor  # (available,) int64

    @property
    def available(self) -> int:
        return self.order.numel()

    def counts(self) -> torch.Tensor:
        """(end - start,) int64: the pairs per expert of the range."""
        return torch.bincount(self.sorted_expert - self.start, minlength=self.end - self.start)


def _route(expert_idx: torch.Tensor, start: int, end: int) -> _Route:
    experts = expert_idx.reshape(-1).long()
    valid = (experts >= start) & (experts < end)
    keys = torch.where(valid, experts, torch.tensor(end))
    sorted_keys, order = torch.sort(keys, stable=True)
    available = int(valid.sum())
    return _Route(expert_idx.shape[0], expert_idx.shape[1], start, end, experts,
                  order[:available], sorted_keys[:available])


def _v2_check_modes(quant_mode: int, drop_pad_mode: int, expert_tokens_num_type: int,
                    row_idx_type: int, x_dtype: int | None) -> None:
    _require(quant_mode in _V2_ALL_QUANT_MODES, f"quant_mode must be one of {_V2_ALL_QUANT_MODES}, got {quant_mode}")
    _require(quant_mode in _V2_QUANT_MODES,
             f"npu_moe_init_routing_v2 quant_mode={quant_mode} (MXFP8 / HIF8 / MXFP4 / FP8 / INT4) is not "
             f"emulated by mc2-emu; emulated: -1 (none), 0 (static int8), 1 (dynamic int8)", NotImplementedError)
    _require(drop_pad_mode in (0, 1), f"drop_pad_mode must be 0 or 1, got {drop_pad_mode}")
    _require(expert_tokens_num_type in (0, 1, 2), f"expert_tokens_num_type must be 0, 1 or 2, got "
                                                  f"{expert_tokens_num_type}")
    _require(row_idx_type in (0, 1), f"row_idx_type must be 0 or 1, got {row_idx_type}")
    _require(x_dtype is None, f"npu_moe_init_routing_v2 x_dtype={x_dtype} (hifloat8 / float4 x) is not emulated "
                              f"by mc2-emu", NotImplementedError)


def _v2_range(active_expert_range: Sequence[int], expert_num: int) -> tuple[int, int]:
    """[start, end): active_expert_range, else [0, expert_num)."""
    if len(active_expert_range) == 0:
        _require(expert_num > 0, "npu_moe_init_routing_v2 needs expert_num > 0 or active_expert_range")
        return 0, expert_num
    _require(len(active_expert_range) == 2, f"active_expert_range must be [start, end], got {active_expert_range}")
    start, end = (int(v) for v in active_expert_range)
    _require(0 <= start < end <= 10240, f"active_expert_range must satisfy 0 <= start < end <= 10240, got "
                                        f"{[start, end]}")
    _require(expert_num <= 0 or end <= expert_num, f"active_expert_range end {end} exceeds expert_num {expert_num}")
    return start, end


def _v2_check_scales(x: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None,
                     quant_mode: int, range_len: int) -> None:
    if quant_mode == 0:
        _require(scale is not None and offset is not None, "quant_mode=0 (static) needs scale and offset of shape (1,)")
    if quant_mode != 0:
        _require(offset is None, f"offset is only taken by quant_mode=0, got it with quant_mode={quant_mode}")
    if quant_mode != -1:
        _require(x.dtype != torch.int8, "x int8 with quantisation: torch_npu documents the output as meaningless")
    if scale is None:
        return
    if quant_mode == -1:
        _check_tensor(scale, "scale", 1, (torch.float32,))
        _require(scale.shape[0] == x.shape[0], f"scale must be (N={x.shape[0]},), got {tuple(scale.shape)}")
    elif quant_mode == 0:
        for name, t in (("scale", scale), ("offset", offset)):
            _check_tensor(t, name, 1, (torch.float32,))
            _require(t.shape[0] == 1, f"{name} must be (1,) in static quant, got {tuple(t.shape)}")
    else:
        _check_tensor(scale, "scale", 2, (torch.float32,))
        _require(scale.shape[0] in (1, range_len) and scale.shape[1] == x.shape[1],
                 f"scale must be (end - start = {range_len}, H) or (1, H) with H={x.shape[1]}, "
                 f"got {tuple(scale.shape)}")


def _drop_pad_slots(route: _Route, expert_num: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``capacity`` pairs of each expert, placed at expert * capacity + rank.
    Returns slots (E * C,) int64 (pair id or -1) and the gather index (N * K,) int32 (slot or -1)."""
    counts = route.counts()
    rank = torch.arange(route.available) - _exclusive_cumsum(counts)[route.sorted_expert]
    keep = rank < capacity
    where = route.sorted_expert[keep] * capacity + rank[keep]
    slots = torch.full((expert_num * capacity,), -1, dtype=torch.long)
    slots[where] = route.order[keep]
    gather = torch.full((route.n * route.k,), -1, dtype=torch.int32)
    gather[route.order[keep]] = where.to(torch.int32)
    return slots, gather


def _dropless_slots(route: _Route, active_num: int, row_idx_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of expanded_x: the first min(rows, available) routed pairs, then -1 (rows =
    N * K, or min(active_num, N * K) when active_num > 0).  Returns slots (rows,) int64 and
    expanded_row_idx (N * K,) int32: scatter (row -> pair id) or gather (pair id -> row), -1
    past the available pairs."""
    nk = route.n * route.k
    rows = nk if active_num <= 0 else min(active_num, nk)
    slots = torch.full((rows,), -1, dtype=torch.long)
    used = min(rows, route.available)
    slots[:used] = route.order[:used]
    row_idx = torch.full((nk,), -1, dtype=torch.int32)
    if row_idx_type == 1:
        row_idx[:route.available] = route.order.to(torch.int32)
    else:
        row_idx[route.order] = torch.arange(route.available, dtype=torch.int32)
    return slots, row_idx


def _v2_expand(x: torch.Tensor, slots: torch.Tensor, route: _Route, scale: torch.Tensor | None,
               offset: torch.Tensor | None, quant_mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expanded_x (rows, H) and expanded_scale: row i = x[slot_i // K], quantised per quant_mode;
    empty slots (-1) give zero rows and zero scales."""
    filled = slots >= 0
    src = slots[filled]
    gathered = x.new_zeros((slots.numel(), x.shape[1]))
    gathered[filled] = x[src // route.k]
    if quant_mode == -1:
        expanded_scale = torch.zeros(slots.numel(), dtype=torch.float32)
        if scale is not None:
            expanded_scale[filled] = scale[src // route.k]
        return gathered, expanded_scale
    if quant_mode == 0:    # round(x * scale + offset), in fp16 as torch_npu's docs specify
        q = (gathered.half() * scale.half()[0] + offset.half()[0]).round().clamp(-128, 127).to(torch.int8)
        return torch.where(filled[:, None], q, torch.zeros_like(q)), torch.zeros((), dtype=torch.float32)
    xf = gathered.float()
    if scale is not None:
        smooth = scale[torch.zeros_like(src) if scale.shape[0] == 1 else route.experts[src] - route.start]
        xf[filled] = xf[filled] * smooth
    return dynamic_quant_rows(xf)


def _expert_tokens(route: _Route, tokens_type: int, flag: bool, expert_num: int) -> torch.Tensor:
    """int64: cumsum (0) / count (1) over the range's experts, or (expert_num, 2) rows
    [expert, count] of the range's non-empty experts then zeros (2); 0-dim without ``flag``."""
    if not flag:
        return torch.zeros((), dtype=torch.int64)
    counts = route.counts()
    if tokens_type == 0:
        return torch.cumsum(counts, 0)
    if tokens_type == 1:
        return counts
    present = torch.nonzero(counts).flatten()
    out = torch.zeros((expert_num, 2), dtype=torch.int64)
    out[:present.numel(), 0] = present + route.start
    out[:present.numel(), 1] = counts[present]
    return out


def _v2_check_drop_pad(route: _Route, expert_capacity: int, expert_num: int, expert_tokens_num_type: int,
                       row_idx_type: int) -> None:
    _require(expert_num > 0 and expert_capacity > 0,
             f"drop_pad_mode=1 needs expert_num > 0 and expert_capacity > 0, got {expert_num}, {expert_capacity}")
    _require((route.start, route.end) == (0, expert_num),
             f"drop_pad_mode=1 needs active_expert_range [0, expert_num={expert_num}], "
             f"got [{route.start}, {route.end}]")
    _require(route.available == route.experts.numel(), f"drop_pad_mode=1: expert ids must lie in [0, {expert_num})")
    _require(row_idx_type == 0, "drop_pad_mode=1 gives a gather row index only (row_idx_type=0)")
    _require(expert_tokens_num_type == 1, f"npu_moe_init_routing_v2 drop_pad_mode=1 with expert_tokens_num_type="
                                          f"{expert_tokens_num_type} is not emulated (count mode 1 only)",
             NotImplementedError)


def npu_moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: torch.Tensor | None = None,
                            offset: torch.Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: Sequence[int] = [],  # torch_npu's default; never mutated
                            row_idx_type: int = 0, x_dtype: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N * K (token, choice) pairs whose expert lies in the active range [start, end)
    (``active_expert_range``, default [0, expert_num)) by (expert, row-major pair id = n * K + k),
    expand x to that order and optionally quantise it.

    x (N, H) fp16/bf16/fp32 (int8 with quant_mode -1); expert_idx (N, K) int32;
    scale: quant -1 (N,) fp32 (gathered into expanded_scale), quant 0 (1,) fp32, quant 1
    (end - start, H) or (1, H) fp32 smooth scale; offset (1,) fp32 (quant 0 only).
    Returns:
      expanded_x: dropless (R, H), R = N * K if active_num <= 0 else min(active_num, N * K),
        row i = x[pair_i // K] for the first min(R, available) routed pairs, zero rows after;
        drop/pad (expert_num, expert_capacity, H), each expert's first expert_capacity pairs,
        zero padded.  x.dtype, or int8 for quant 0 / 1.
      expanded_row_idx (N * K,) int32: gather (row_idx_type 0: [pair id] -> row or slot, -1 if
        outside the range / dropped) or scatter (1: [row] -> pair id, -1 past ``available``).
      expert_tokens (int64): (end - start,) cumsum / count, or (expert_num, 2) key-value rows
        [expert, count] of the non-empty experts then zeros; 0-dim if not expert_tokens_num_flag.
      expanded_scale (R,) or (expert_num * expert_capacity,) fp32: the dynamic scales
        (quant 1), gathered ``scale`` or zeros (quant -1); 0-dim for quant 0.
    """
    _v2_check_modes(quant_mode, drop_pad_mode, expert_tokens_num_type, row_idx_type, x_dtype)
    _check_tensor(x, "x", 2, _FLOATS + (torch.int8,))
    _check_tensor(expert_idx, "expert_idx", 2, (torch.int32,))
    _require(x.shape[0] == expert_idx.shape[0], f"x has {x.shape[0]} rows but expert_idx has {expert_idx.shape[0]}")
    _require(active_num >= -1, f"active_num must be >= -1, got {active_num}")
    _require(expert_tokens_num_type != 2 or expert_num > 0, "expert_tokens_num_type=2 (key-value) needs expert_num > 0")
    start, end = _v2_range(active_expert_range, expert_num)
    _v2_check_scales(x, scale, offset, quant_mode, end - start)
    route = _route(expert_idx, start, end)
    if drop_pad_mode == 1:
        _v2_check_drop_pad(route, expert_capacity, expert_num, expert_tokens_num_type, row_idx_type)
        slots, expanded_row_idx = _drop_pad_slots(route, expert_num, expert_capacity)
    else:
        slots, expanded_row_idx = _dropless_slots(route, active_num, row_idx_type)
    expanded_x, expanded_scale = _v2_expand(x, slots, route, scale, offset, quant_mode)
    if drop_pad_mode == 1:
        expanded_x = expanded_x.reshape(expert_num, expert_capacity, x.shape[1])
    tokens = _expert_tokens(route, expert_tokens_num_type, expert_tokens_num_flag, expert_num)
    return expanded_x, expanded_row_idx, tokens, expanded_scale


# ----------------------------------------------------------------------------- finalize_routing

def _finalize_index(expanded_src_to_dst_row: torch.Tensor, mode: int, num_rows: int, k: int,
                    num_slots: int) -> torch.Tensor:
    """(num_rows, k) int64 rows of expanded_permuted_rows (-1 = dropped) from the (N * K,) index:
    column layout [k * N + n] (modes 0, 1) or row layout [n * K + k] (modes 2, 3)."""
    idx = expanded_src_to_dst_row.long()
    _require(idx.numel() == 0 or (int(idx.min()) >= -1 and int(idx.max()) < num_slots),
             f"expanded_src_to_dst_row values must lie in [-1, {num_slots})")
    return idx.reshape(k, num_rows).t() if mode in (0, 1) else idx.reshape(num_rows, k)


def _finalize_check(rows: torch.Tensor, skip1: torch.Tensor | None, skip2: torch.Tensor | None,
                    mode: int, num_rows: int) -> None:
    _require(mode in (0, 1, 2, 3), f"drop_pad_mode must be in [0, 3], got {mode}")
    _check_tensor(rows, "expanded_permuted_rows", 3 if mode in (1, 3) else 2, _FLOATS)
    _require(skip1 is not None or skip2 is None, "skip2 must be None when skip1 is None")
    for name, t in (("skip1", skip1), ("skip2", skip2)):
        if t is not None:
            _check_tensor(t, name, 2, (rows.dtype,))
            _require(tuple(t.shape) == (num_rows, rows.shape[-1]),
                     f"{name} must be (NUM_ROWS={num_rows}, H={rows.shape[-1]}), got {tuple(t.shape)}")


def npu_moe_finalize_routing(expanded_permuted_rows: torch.Tensor, skip1: torch.Tensor | None,
                             skip2: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor | None,
                             expanded_src_to_dst_row: torch.Tensor, export_for_source_row: torch.Tensor | None,
                             drop_pad_mode: int | None = 0, k: int | None = 1) -> torch.Tensor:
    """out[n] = skip1[n] + skip2[n] + sum_j scales[n, j] * (rows[dst(n, j)] + bias[expert(n, j)]),
    computed in fp32; a dst of -1 (a dropped slot) reads a zero row (bias still added).

    expanded_permuted_rows (N * K, H) (drop_pad_mode 0 / 2) or (E, C, H) (1 / 3), fp16/bf16/fp32;
    skip1, skip2 (N, H) same dtype, optional (skip2 needs skip1); bias (E, H) optional;
    scales (N, K) optional (absent: 1, and K = ``k``); expanded_src_to_dst_row (N * K,) int32,
    dst(n, j) at [j * N + n] for modes 0 / 1 (``npu_moe_init_routing``'s expanded_row_idx) and
    at [n * K + j] for modes 2 / 3 (``npu_moe_init_routing_v2``'s gather index);
    export_for_source_row (N, K) int32 expert ids, needed with bias.
    Returns out (N, H) in expanded_permuted_rows' dtype.
    """
    mode = 0 if drop_pad_mode is None else drop_pad_mode
    kk = scales.shape[1] if scales is not None else (1 if k is None else k)
    _require(kk > 0, f"k must be > 0, got {kk}")
    nk = expanded_src_to_dst_row.numel()
    num_rows = scales.shape[0] if scales is not None else nk // kk
    _finalize_check(expanded_permuted_rows, skip1, skip2, mode, num_rows)
    _check_tensor(expanded_src_to_dst_row, "expanded_src_to_dst_row", 1, (torch.int32,))
    _require(nk == num_rows * kk, f"expanded_src_to_dst_row has {nk} entries, expected NUM_ROWS * K = {num_rows * kk}")
    H = expanded_permuted_rows.shape[-1]
    flat = expanded_permuted_rows.reshape(-1, H).float()
    dst = _finalize_index(expanded_src_to_dst_row, mode, num_rows, kk, flat.shape[0])
    picked = torch.where((dst >= 0)[..., None], flat[dst.clamp_min(0)], torch.zeros(()))
    if bias is not None:
        _require(export_for_source_row is not None, "bias needs export_for_source_row (the experts of each row)")
        _check_tensor(bias, "bias", 2, (expanded_permuted_rows.dtype,))
        _check_tensor(export_for_source_row, "export_for_source_row", 2, (torch.int32,))
        _require(tuple(export_for_source_row.shape) == (num_rows, kk),
                 f"export_for_source_row must be (N={num_rows}, K={kk}), got {tuple(export_for_source_row.shape)}")
        picked = picked + bias.float()[export_for_source_row.long()]
    if scales is not None:
        _check_tensor(scales, "scales", 2, _FLOATS)
        picked = picked * scales.float()[..., None]
    out = picked.sum(1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(expanded_permuted_rows.dtype)


# ----------------------------------------------------------------------------- expert tokens

def npu_moe_compute_expert_tokens(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> torch.Tensor:
    """For each expert e < num_expert, the end of its run in the sorted list: the number of
    entries <= e (a binary search).

    sorted_expert_for_source_row (M,) int32, non-decreasing, values in [0, num_expert);
    0 < num_expert <= 2048.  Returns (num_expert,) int32.
    """
    s = sorted_expert_for_source_row
    _check_tensor(s, "sorted_expert_for_source_row", 1, (torch.int32,))
    _require(0 < num_expert <= 2048, f"num_expert must lie in (0, 2048], got {num_expert}")
    _require(bool((s[1:] >= s[:-1]).all()), "sorted_expert_for_source_row must be non-decreasing")
    experts = torch.arange(num_expert, dtype=torch.int32)
    return torch.searchsorted(s.contiguous(), experts, right=True).to(torch.int32)


# ----------------------------------------------------------------------------- re_routing

def _re_routing_index(counts: torch.Tensor) -> torch.Tensor:
    """counts (N ranks, E experts) -> (A,) int64 gather index: the tokens arrive rank-major
    (rank 0's expert 0, 1, ..., then rank 1's, ...), leave expert-major (expert 0's from rank 0,
    1, ..., then expert 1's, ...), each (rank, expert) block keeping its order."""
    n, e = counts.shape
    flat = counts.reshape(-1)
    src_start = _exclusive_cumsum(flat)
    dst_start = _exclusive_cumsum(counts.t().reshape(-1)).reshape(e, n).t().reshape(-1)
    total = int(flat.sum())
    block = torch.repeat_interleave(torch.arange(n * e), flat)
    src = torch.arange(total)
    dst = dst_start[block] + (src - src_start[block])
    index = torch.empty(total, dtype=torch.long)
    index[dst] = src
    return index


def _re_routing_modes(expert_token_num_type: int, idx_type: int, tokens_dtype: int | None) -> None:
    _require(expert_token_num_type == 1, f"npu_moe_re_routing expert_token_num_type={expert_token_num_type} is not "
                                         f"emulated (torch_npu supports count mode 1 only)", NotImplementedError)
    _require(idx_type == 0, f"npu_moe_re_routing idx_type={idx_type} is not emulated (torch_npu supports gather "
                            f"index 0 only)", NotImplementedError)
    _require(tokens_dtype is None, f"npu_moe_re_routing tokens_dtype={tokens_dtype} (hifloat8 / float4 tokens) is not "
                                   f"emulated by mc2-emu", NotImplementedError)


def npu_moe_re_routing(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
                       per_token_scales: torch.Tensor | None = None, expert_token_num_type: int = 1,
                       idx_type: int = 0, tokens_dtype: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder tokens received rank-major into expert-major order.

    tokens (A, H) fp16/bf16/int8, A = sum(expert_token_num_per_rank); expert_token_num_per_rank
    (N, E) int32/int64, [i, j] = tokens from rank i for local expert j (>= 0);
    per_token_scales (A,) fp32, optional.
    Returns permute_tokens (A, H) tokens.dtype; permute_per_token_scales (A,) (per_token_scales
    reordered, else zeros fp32); permute_token_idx (A,) int32, the gather index
    (permute_tokens[i] = tokens[permute_token_idx[i]]); expert_token_num (E,) (count mode, the
    dtype of expert_token_num_per_rank).
    """
    _re_routing_modes(expert_token_num_type, idx_type, tokens_dtype)
    _check_tensor(tokens, "tokens", 2, (torch.float16, torch.bfloat16, torch.int8))
    counts = expert_token_num_per_rank
    _check_tensor(counts, "expert_token_num_per_rank", 2, (torch.int32, torch.int64))
    _require(bool((counts >= 0).all()), "expert_token_num_per_rank must be >= 0")
    _require(int(counts.sum()) == tokens.shape[0],
             f"sum(expert_token_num_per_rank) = {int(counts.sum())} must equal the {tokens.shape[0]} tokens")
    if per_token_scales is not None:
        _check_tensor(per_token_scales, "per_token_scales", 1, (torch.float32,))
        _require(per_token_scales.shape[0] == tokens.shape[0],
                 f"per_token_scales must be (A={tokens.shape[0]},), got {tuple(per_token_scales.shape)}")
    index = _re_routing_index(counts.long())
    scales = (per_token_scales[index] if per_token_scales is not None
              else torch.zeros(tokens.shape[0], dtype=torch.float32))
    return tokens[index], scales, index.to(torch.int32), counts.sum(0).to(counts.dtype)


# ----------------------------------------------------------------------------- fake kernels
# Output shapes and dtypes only (graph capture, FakeTensorMode, meta tensors), as torch_npu 2.14's
# meta functions allocate them; the argument checks that need no data are the kernels' own.

def _gating_fake(x: torch.Tensor, finished: torch.Tensor | None = None,
                 k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require(x.dim() in (2, 3), f"x must be a 2-D or 3-D tensor, got {tuple(x.shape)}")
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32), x.new_empty(shape, dtype=torch.int32)


def _init_routing_fake(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor,
                       active_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = expert_idx.shape
    return (x.new_empty((min(n, active_num) * k, x.shape[1])), row_idx.new_empty((n * k,)),
            row_idx.new_empty((n * k,)))


def _init_routing_v2_fake(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: torch.Tensor | None = None,
                          offset: torch.Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                          expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                          expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                          active_expert_range: Sequence[int] = [], row_idx_type: int = 0, x_dtype: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _v2_check_modes(quant_mode, drop_pad_mode, expert_tokens_num_type, row_idx_type, x_dtype)
    start, end = _v2_range(active_expert_range, expert_num)
    n, k = expert_idx.shape
    h = x.shape[1]
    dtype = torch.int8 if quant_mode in (0, 1) else x.dtype
    if drop_pad_mode == 1:
        rows_shape, scale_shape = (expert_num, expert_capacity, h), (expert_num * expert_capacity,)
    else:
        rows = n * k if active_num <= 0 else min(active_num, n * k)
        rows_shape, scale_shape = (rows, h), (rows,)
    if not expert_tokens_num_flag:
        tokens_shape: tuple = ()
    else:
        tokens_shape = (expert_num, 2) if expert_tokens_num_type == 2 else (end - start,)
    return (x.new_empty(rows_shape, dtype=dtype), x.new_empty((n * k,), dtype=torch.int32),
            x.new_empty(tokens_shape, dtype=torch.int64),
            x.new_empty(() if quant_mode == 0 else scale_shape, dtype=torch.float32))


def _finalize_routing_fake(expanded_permuted_rows: torch.Tensor, skip1: torch.Tensor | None,
                           skip2: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor | None,
                           expanded_src_to_dst_row: torch.Tensor, export_for_source_row: torch.Tensor | None,
                           drop_pad_mode: int | None = 0, k: int | None = 1) -> torch.Tensor:
    mode = 0 if drop_pad_mode is None else drop_pad_mode
    kk = 1 if k is None else k
    rows = scales.shape[0] if scales is not None else expanded_src_to_dst_row.shape[0] // kk
    return expanded_permuted_rows.new_empty((rows, expanded_permuted_rows.shape[2 if mode in (1, 3) else 1]))


def _compute_expert_tokens_fake(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> torch.Tensor:
    return sorted_expert_for_source_row.new_empty((num_expert,), dtype=torch.int32)


def _re_routing_fake(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
                     per_token_scales: torch.Tensor | None = None, expert_token_num_type: int = 1,
                     idx_type: int = 0, tokens_dtype: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _re_routing_modes(expert_token_num_type, idx_type, tokens_dtype)
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
