"""torch_npu 2.14.0's compute operators between MoE gating and combine, on CPU tensors.

Each operator has a kernel (plain torch on CPU tensors, vectorised over rows; loops only over
groups, experts or top-k slots) and a fake kernel (output shapes and dtypes only, no tensor data
read) with the Python signature of its schema in torch_npu 2.14.0's
``npu_native_functions_by_codegen.yaml``.  :data:`KERNELS` maps the schema name (with overload)
to ``(kernel, fake)``; :mod:`emu.npu.registry` makes them dispatcher ops.

Sources, read for the semantics (nothing copied): torch_npu 2.14.0's API docs
(``torch_npu/_op_plugin_docs.py``) and meta functions; op-plugin's adapters
(``op_plugin/ops/opapi/GroupedMatmulKernelNpuOpApi.cpp``, ``DequantSwigluQuantOpApi.cpp``,
``DynamicQuantKernelNpuOpApi.cpp``, ``MoeTokenUnpermuteKernelNpuOpApi.cpp``, the codegen entries
of ``npu_swiglu`` / ``npu_moe_token_permute`` in ``op_plugin_functions.yaml``); the aclnn checks,
tiling and AscendC kernels of hicann/ops-transformer (``gmm/grouped_matmul``,
``moe/moe_token_permute``, ``moe/moe_token_unpermute``) and hicann/ops-nn
(``quant/dequant_swiglu_quant``, ``quant/dynamic_quant``, ``activation/swi_glu``).

Numerics follow the A2 / A3 kernels: fp32 compute, one rounding (round-to-nearest-even) to the
output dtype; int8 x int8 accumulates in int32.  Where the device leaves memory unwritten
(grouped matmul rows past the last group, dequant_swiglu_quant rows past the sum of
``group_index``) the emulator writes zeros.  Modes no MoE layer on A2 / A3 needs raise
``NotImplementedError`` naming the mode; inputs the operator rejects raise
:class:`~emu.core.errors.AclnnError` (a RuntimeError) with the aclnn code: 161002 for
parameter checks (aclnn, torch_npu's ``TORCH_CHECK`` s and documented constraints), 161001
for a missing required tensor, 561002 for checks that live in the operator's tiling; input
outside the documented contract that the kernel accepts is computed as the kernel does, with a
:class:`~emu.core.errors.ContractWarning` (``EMU_STRICT=1``: an error), :mod:`emu.core.contract`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.contract import fail, reject, tolerate
from ..core.errors import PARAM_NULLPTR, TILING_ERROR
from .dtypes import dtype_name, torch_dtype
from .schemas import bound_arguments

__all__ = ["KERNELS", "npu_dequant_swiglu_quant", "npu_dynamic_quant", "npu_grouped_matmul",
           "npu_grouped_matmul_list", "npu_moe_token_permute", "npu_moe_token_unpermute", "npu_swiglu"]

Tensor = torch.Tensor
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_MAX_TENSOR_LIST = 128          # aclnn grouped matmul: x / weight lists, and an int-array group_list
_MAX_GROUP_TENSOR = 1024        # aclnn grouped matmul: a Tensor group_list
_MAX_INNER_AXIS = 65535         # aclnn grouped matmul: K and N of x / weight
_SORT_LIMIT = 16777215          # moe_token_permute tiling: T * topK must stay below (fp32-exact sort keys)
_MAX_TOPK = 512                 # moe_token_permute tiling
_INV_127 = torch.tensor(1.0 / 127.0, dtype=torch.float32)   # dequant_swiglu_quant's DYNAMIC_QUANT_FACTOR
_QUINT4X2 = 16                  # torch's ScalarType code of quint4x2: npu_dynamic_quant's int4 output
_INT4_PER_INT32 = 8


# ============================================================================ shared helpers

_fail = fail            # what the operator raises (emu.core.contract): AclnnError with its code
_check = reject


def _emulated(ok: bool, message: str) -> None:
    """A mode mc2-emu does not emulate (the operator may accept it)."""
    if not ok:
        raise NotImplementedError(f"{message} is not emulated by mc2-emu")


def _dtype_arg(value: int | torch.dtype | None, op: str, name: str) -> torch.dtype | None:
    """An ``int?`` dtype argument: torch's ScalarType code or a torch_npu code (``torch_npu.int8``
    258, ...; a torch.dtype is taken as itself).  A code of a dtype torch lacks (hifloat8, fp4,
    int4, ...) names no kernel variant of the A2 / A3 operators here: 161002."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = torch_dtype(value)
    _check(dtype is not None, f"{op}: {name}={dtype_name(value)} is not supported on Atlas A2 / A3")
    return dtype


def _tensors(value: Sequence[Tensor] | None) -> list[Tensor] | None:
    """An optional ``Tensor[]``: None and [] both mean "not given"."""
    return list(value) if value else None


def _swish(a: Tensor, beta: float = -1.0) -> Tensor:
    """a / (1 + exp(beta * a)) in fp32, in the kernels' order (Muls, Exp, Adds 1, Div); beta -1 is SiLU."""
    return a / (torch.exp(a * beta) + 1.0)


def _to_int8(y: Tensor) -> Tensor:
    """fp32 -> int8 as the quant kernels cast: round half to even to int32, then to int8."""
    return torch.nan_to_num(y, nan=0.0).round().clamp(-128, 127).to(torch.int8)


# ============================================================================ npu_swiglu

def _swiglu_dim(x: Tensor, dim: int) -> int:
    _check(x.dtype in _FLOATS, f"npu_swiglu: x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    _check(x.dim() > 0, "npu_swiglu: x must have at least one dimension")
    _check(-x.dim() <= dim < x.dim(), f"npu_swiglu: dim {dim} out of range [{-x.dim()}, {x.dim() - 1}]")
    d = dim % x.dim()
    _check(x.shape[d] % 2 == 0, f"npu_swiglu: x.shape[{d}] = {x.shape[d]} must be even (aclnnSwiGlu)")
    return d


def npu_swiglu(self: Tensor, dim: int = -1) -> Tensor:
    """SwiGLU: x split in halves A | B along ``dim``; out = A * sigmoid(A) * B.

    self (..., 2h, ...) fp16 / bf16 / fp32 (the ``dim`` size even); returns (..., h, ...) in
    self.dtype.  Computed in fp32 as the kernel does (A / (1 + exp(-A)) * B), rounded once.
    """
    d = _swiglu_dim(self, dim)
    h = self.shape[d] // 2
    a, b = self.narrow(d, 0, h).float(), self.narrow(d, h, h).float()
    return (_swish(a) * b).to(self.dtype)


def _swiglu_fake(self: Tensor, dim: int = -1) -> Tensor:
    d = _swiglu_dim(self, dim)
    shape = list(self.shape)
    shape[d] //= 2
    return self.new_empty(shape)


# ============================================================================ npu_dynamic_quant

def _dynamic_quant_check(x: Tensor, smooth_scales: Tensor | None, group_index: Tensor | None,
                         dst_type: int | torch.dtype | None, quant_mode: str, dst_type_max: float) -> None:
    _check(x.dim() > 1, f"npu_dynamic_quant: input must have more than one dimension, got {x.dim()}")
    _check(quant_mode in ("pertoken", "pertensor", "perchannel"),
           f"npu_dynamic_quant: quant_mode must be pertoken, pertensor or perchannel, got {quant_mode!r}")
    _emulated(quant_mode == "pertoken", f"npu_dynamic_quant quant_mode={quant_mode!r}")
    if _dynamic_quant_int4(dst_type):
        _check(x.shape[-1] % _INT4_PER_INT32 == 0,
               "npu_dynamic_quant: Input shape last dim must be divded by 8 when int4 quantization")
    else:
        dst = _dtype_arg(dst_type, "npu_dynamic_quant", "dst_type")
        _check(dst in (None, torch.int8), f"npu_dynamic_quant: dst_type {dtype_name(dst_type)} is not supported on "
                                          f"Atlas A2 / A3: y must be int8, or int4 (torch.quint4x2) packed in int32")
    _emulated(dst_type_max == 0.0, f"npu_dynamic_quant dst_type_max={dst_type_max}")
    _check(x.dtype in (torch.float16, torch.bfloat16),
           f"npu_dynamic_quant: input dtype must be float16 or bfloat16, got {x.dtype}")
    if group_index is not None:
        _check(smooth_scales is not None, "npu_dynamic_quant: group_index needs smooth_scales")
        _check(group_index.dtype == torch.int32 and group_index.dim() == 1,
               f"npu_dynamic_quant: group_index must be a 1-D int32 tensor, got {group_index.dtype} "
               f"{tuple(group_index.shape)}")
    if smooth_scales is not None:
        want = (x.shape[-1],) if group_index is None else (group_index.shape[0], x.shape[-1])
        _check(tuple(smooth_scales.shape) == want,
               f"npu_dynamic_quant: smooth_scales shape must be {want}, got {tuple(smooth_scales.shape)}")
        _check(smooth_scales.dtype == x.dtype,
               f"npu_dynamic_quant: smooth_scales dtype {smooth_scales.dtype} must equal the input's {x.dtype}")
        _check(group_index is None or group_index.shape[0] <= 1024,
               "npu_dynamic_quant: at most 1024 groups (smooth_scales rows)")


def _dynamic_quant_int4(dst_type: int | torch.dtype | None) -> bool:
    """torch_npu's int4 output: dst_type torch.quint4x2 (its ScalarType code 16)."""
    return dst_type == torch.quint4x2 or (isinstance(dst_type, int) and dst_type == _QUINT4X2)


def _pack_int4(y: Tensor) -> Tensor:
    """(..., H) int4 values in [-8, 7] -> (..., H / 8) int32, value j of a word in its bits 4j..4j+3
    (the order the device writes: little-endian, low nibble first)."""
    nibbles = (y.to(torch.int64) & 0xF).reshape(*y.shape[:-1], -1, _INT4_PER_INT32)
    shifts = torch.arange(0, 4 * _INT4_PER_INT32, 4, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _smooth_rows(smooth: Tensor, group_index: Tensor, rows: int) -> Tensor:
    """The smooth scale of each row (rows, H): group g's row ends at group_index[g] (cumulative);
    out of contract (decreasing ends, or the last one not the row count: the docs call the result
    meaningless): ends are clamped to [0, rows] and made non-decreasing, rows past the last end
    are scaled by 1, as Huawei's golden leaves them."""
    ends = group_index.long().clamp(0, rows)
    ends = torch.cummax(ends, 0).values
    counts = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))
    per_row = smooth.repeat_interleave(counts, dim=0)
    return torch.cat([per_row, smooth.new_ones((rows - per_row.shape[0], smooth.shape[1]))])


def npu_dynamic_quant(input: Tensor, *, smooth_scales: Tensor | None = None, group_index: Tensor | None = None,
                      dst_type: int | None = None, quant_mode: str = "pertoken",
                      dst_type_max: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8 or int4, in the DynamicQuant kernel's arithmetic (ops-nn
    ``dynamic_quant``): per row of v = x * s (fp32), m = max|v|, scale = m * fp32(1/Q) and
    y = rint(v * (Q / m)), Q = 127 (int8) or 7 (int4, clamped to [-8, 7]); an all-zero row gives
    y 0, scale 0.

    input (..., H) fp16 / bf16; smooth_scales (H,) in input's dtype, or (G, H) with group_index
    (G,) int32 cumulative row ends (rows [gi[g-1], gi[g]) use smooth_scales[g]; non-decreasing,
    the last equal to the row count).  dst_type None / int8: y (..., H) int8; torch.quint4x2
    (int4, H % 8 == 0): y (..., H / 8) int32, eight int4 per word (low nibble first), as
    torch_npu allocates it.  Returns y and scale (...) fp32.  Only pertoken is emulated.
    """
    _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    xf = input.float().reshape(-1, input.shape[-1])
    if smooth_scales is not None:
        smooth = smooth_scales.float()
        if group_index is not None:
            ends = group_index.long()
            tolerate(bool((ends >= 0).all() and (ends[1:] >= ends[:-1]).all()) and int(ends[-1]) == xf.shape[0],
                     f"npu_dynamic_quant: group_index must be non-negative, non-decreasing and end at the row count "
                     f"{xf.shape[0]} (the docs: otherwise the result is meaningless)")
            smooth = _smooth_rows(smooth, ends, xf.shape[0])
        xf = xf * smooth
    amax = xf.abs().amax(-1)
    shape = input.shape[:-1]
    if _dynamic_quant_int4(dst_type):
        q = torch.nan_to_num(xf * (torch.tensor(7.0) / amax)[:, None], nan=0.0).round().clamp(-8, 7)
        y = _pack_int4(q.reshape(*shape, input.shape[-1]))
        return y, (amax * torch.tensor(1.0 / 7.0, dtype=torch.float32)).reshape(shape)
    y = _to_int8(xf * (torch.tensor(127.0) / amax)[:, None])          # 0 * inf of a zero row: NaN -> 0
    return y.reshape(input.shape), (amax * _INV_127).reshape(shape)


def _dynamic_quant_fake(input: Tensor, *, smooth_scales: Tensor | None = None, group_index: Tensor | None = None,
                        dst_type: int | None = None, quant_mode: str = "pertoken",
                        dst_type_max: float = 0.0) -> tuple[Tensor, Tensor]:
    _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    if _dynamic_quant_int4(dst_type):
        y = input.new_empty((*input.shape[:-1], input.shape[-1] // _INT4_PER_INT32), dtype=torch.int32)
    else:
        y = input.new_empty(input.shape, dtype=torch.int8)
    return y, input.new_empty(input.shape[:-1], dtype=torch.float32)


# ============================================================================ npu_dequant_swiglu_quant

@dataclass(frozen=True)
class _Dsq:
    """One npu_dequant_swiglu_quant call (its torch_npu arguments)."""

    x: Tensor
    weight_scale: Tensor | None
    activation_scale: Tensor | None
    bias: Tensor | None
    quant_scale: Tensor | None
    quant_offset: Tensor | None
    group_index: Tensor | None
    activate_left: bool
    quant_mode: int
    dst_type: int | None
    round_mode: int | None
    activate_dim: int | None
    swiglu_mode: int
    clamp_limit: float
    glu_alpha: float
    glu_bias: float


def _dsq_check_attrs(c: _Dsq) -> None:
    """torch_npu's own checks (DequantSwigluQuantOpApi.cpp) and the modes mc2-emu emulates."""
    x = c.x
    _check(x.dim() > 1, "npu_dequant_swiglu_quant: x dim should larger than 1")
    _check(c.quant_mode in (0, 1), f"npu_dequant_swiglu_quant: quant_mode only support 0 or 1, but got {c.quant_mode}")
    _check(c.swiglu_mode in (0, 1, 2),
           f"npu_dequant_swiglu_quant: swiglu_mode only support 0, 1 or 2, but got {c.swiglu_mode}")
    _check(math.isfinite(c.clamp_limit) and c.clamp_limit > 0,
           "npu_dequant_swiglu_quant: clamp_limit should be positive finite")
    _check(math.isfinite(c.glu_alpha) and math.isfinite(c.glu_bias),
           "npu_dequant_swiglu_quant: glu_alpha and glu_bias should be finite")
    _check(x.shape[-1] % 2 == 0, "npu_dequant_swiglu_quant: x last dim should be even")
    _emulated(c.quant_mode == 1, "npu_dequant_swiglu_quant quant_mode=0 (static quant)")


def _dsq_contract(c: _Dsq) -> None:
    """What the A2 / A3 path accepts and ignores (DequantSwigluQuantOpApi.cpp below Ascend 950:
    dst_type, round_mode and activate_dim are not passed on: int8, rint, the last dim; the kernel
    without group_index computes swiglu_mode 0 whatever the mode)."""
    op = "npu_dequant_swiglu_quant"
    tolerate(c.dst_type in (None, 1, 258), f"{op}: dst_type={dtype_name(c.dst_type)} is ignored on Atlas A2 / A3 "
                                           f"(the output is int8)")
    tolerate(c.round_mode in (None, 0), f"{op}: round_mode={c.round_mode} is ignored on Atlas A2 / A3 (rint)")
    tolerate(c.activate_dim in (None, -1, c.x.dim() - 1),
             f"{op}: activate_dim={c.activate_dim} is ignored on Atlas A2 / A3 (the last dim)")
    tolerate(c.group_index is not None or c.swiglu_mode == 0,
             f"{op}: swiglu_mode={c.swiglu_mode} without group_index is ignored by the A2 / A3 kernel (mode 0)")


def _dsq_check_tensors(c: _Dsq) -> int:
    """The tensor checks (docs, aclnnDequantSwigluQuantV2 and its tilings); returns the group count
    (0 without group_index)."""
    x, two_h = c.x, c.x.shape[-1]
    _check(x.dim() == 2, f"npu_dequant_swiglu_quant: x must be 2-D (TokensNum, 2H) on A2 / A3, got {tuple(x.shape)}")
    _check(x.dtype in (torch.int32, torch.bfloat16),
           f"npu_dequant_swiglu_quant: x dtype must be int32 or bfloat16, got {x.dtype}")
    if x.dtype != torch.int32:
        _check(c.weight_scale is None and c.activation_scale is None and c.bias is None,
               "npu_dequant_swiglu_quant: weight_scale, activation_scale and bias must be None unless x is int32")
    else:
        _check(c.weight_scale is not None, "npu_dequant_swiglu_quant: weight_scale is required when x is int32",
               PARAM_NULLPTR)
    _check(c.quant_offset is None, "npu_dequant_swiglu_quant: quant_offset must be None in dynamic quant mode")
    _check(c.swiglu_mode != 1 or c.activate_left, "npu_dequant_swiglu_quant: swiglu_mode 1 needs activate_left=True")
    groups = 0
    if c.group_index is not None:
        gi = c.group_index
        _emulated(gi.dim() == 1, "npu_dequant_swiglu_quant with a 2-D group_index (expert id, count pairs)")
        _check(gi.dtype == torch.int64, f"npu_dequant_swiglu_quant: group_index dtype must be int64, got {gi.dtype}")
        _check(c.bias is None, "npu_dequant_swiglu_quant: bias must be None when group_index is given")
        _check(two_h % 64 == 0, f"npu_dequant_swiglu_quant: the last dimension of x ({two_h}) must be divisible by 64 "
                                f"when group_index is given")
        groups = max(int(gi.shape[0]), 1)
    if c.activation_scale is not None:
        _check(c.activation_scale.dtype == torch.float32 and c.activation_scale.numel() == x.shape[0],
               f"npu_dequant_swiglu_quant: activation_scale must be fp32 with {x.shape[0]} elements, got "
               f"{c.activation_scale.dtype} {tuple(c.activation_scale.shape)}")
    if c.weight_scale is not None:
        _check(c.weight_scale.dtype == torch.float32, "npu_dequant_swiglu_quant: weight_scale dtype must be float32")
        _dsq_check_row_param(c.weight_scale, "weight_scale", two_h, groups)
    if c.bias is not None:
        _check(c.bias.dtype in (torch.int32, torch.float32, torch.float16, torch.bfloat16),
               f"npu_dequant_swiglu_quant: bias dtype must be int32, float32, float16 or bfloat16, got {c.bias.dtype}")
        _check(c.bias.numel() == two_h, f"npu_dequant_swiglu_quant: bias must have {two_h} elements")
    if c.quant_scale is not None:
        qs = c.quant_scale
        if groups:
            _check(qs.dtype in _FLOATS, f"npu_dequant_swiglu_quant: quant_scale dtype {qs.dtype} not supported")
            _dsq_check_row_param(qs, "quant_scale", two_h // 2, groups)
        else:
            _check(qs.dtype == torch.float32 and qs.numel() in (1, two_h // 2),
                   f"npu_dequant_swiglu_quant: quant_scale must be fp32 with 1 or {two_h // 2} elements")
    return groups


def _dsq_check_row_param(t: Tensor, name: str, width: int, groups: int) -> None:
    """A per-group row parameter: (width,) / (1, width) for one group, (groups, width) for several."""
    ok = t.dim() >= 1 and t.shape[-1] == width
    if groups > 1:
        ok = ok and t.dim() == 2 and t.shape[0] == groups
    else:
        ok = ok and t.dim() <= 2 and (t.dim() == 1 or t.shape[0] == 1)
    _check(ok, f"npu_dequant_swiglu_quant: {name} shape {tuple(t.shape)} must be "
               f"{(groups, width) if groups > 1 else f'({width},) or (1, {width})'}")


def _dsq_activate(c: _Dsq, xf: Tensor) -> Tensor:
    """The SwiGLU of the dequantised rows xf (R, 2H) fp32 -> (R, H) fp32, as the kernels compute it."""
    h = xf.shape[-1] // 2
    if c.swiglu_mode == 1:                                     # GPT-OSS variant, even / odd columns
        act, gate = xf[:, 0::2], xf[:, 1::2]
    else:
        left, right = xf[:, :h], xf[:, h:]
        act, gate = (left, right) if c.activate_left else (right, left)
    if c.swiglu_mode == 0:
        return gate * _swish(act)
    limit = torch.tensor(c.clamp_limit, dtype=torch.float32)
    gate = torch.minimum(gate, limit).clamp_min(-limit) + torch.tensor(c.glu_bias, dtype=torch.float32)
    act = torch.minimum(act, limit)
    beta = float(torch.tensor(-c.glu_alpha, dtype=torch.float32))
    return gate * _swish(act, beta)


def _dsq_grouped(c: _Dsq, groups: int) -> tuple[Tensor, Tensor]:
    """The kernel with group_index (DequantSwigluQuantBase): per group g (counts, negative = 0) the
    rows' own weight_scale[g] / quant_scale[g]; scale = amax * fp32(1/127), y = rint(v / scale)."""
    rows, two_h = c.x.shape
    counts = [max(int(v), 0) for v in c.group_index.reshape(-1).tolist()] or [0]
    if tolerate(sum(counts) <= rows, f"npu_dequant_swiglu_quant: the sum of group_index ({sum(counts)}) must not "
                                     f"exceed x's rows ({rows}) (the device reads past x; here the groups stop there)"):
        ends = torch.tensor(counts).cumsum(0).clamp_max(rows)
        counts = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long)).tolist()
    y = torch.zeros(rows, two_h // 2, dtype=torch.int8)
    scale = torch.zeros(rows, dtype=torch.float32)
    act_scale = None if c.activation_scale is None else c.activation_scale.reshape(-1).float()
    start = 0
    for g, n in enumerate(counts[:groups]):
        if n == 0:
            continue
        xf = c.x[start:start + n].float()
        if c.weight_scale is not None:
            xf = c.weight_scale.reshape(-1, two_h)[g if groups > 1 else 0] * xf
            if act_scale is not None:
                xf = act_scale[start:start + n, None] * xf
        v = _dsq_activate(c, xf)
        if c.quant_scale is not None:
            v = c.quant_scale.reshape(-1, two_h // 2)[g if groups > 1 else 0].float() * v
        s = v.abs().amax(-1) * _INV_127
        y[start:start + n] = _to_int8(v / s[:, None])
        scale[start:start + n] = s
        start += n
    return y, scale


def _dsq_whole(c: _Dsq) -> tuple[Tensor, Tensor]:
    """The kernel without group_index (DequantSwigluQuant tiling base): every row, one set of
    parameters; int32 bias before the dequant, float bias after; scale = amax / 127,
    y = rint(v * (1 / scale))."""
    x, two_h = c.x, c.x.shape[-1]
    bias = c.bias.reshape(-1) if c.bias is not None else None
    if bias is not None and bias.dtype == torch.int32:
        x = (x.long() + bias.long()).to(torch.int32)
    xf = x.float()
    if c.weight_scale is not None:
        xf = xf * c.weight_scale.reshape(two_h)
        if c.activation_scale is not None:
            xf = xf * c.activation_scale.reshape(-1, 1)
    if bias is not None and bias.dtype != torch.int32:
        xf = xf + bias.float()
    v = _dsq_activate(c, xf)
    if c.quant_scale is not None:
        v = v * c.quant_scale.reshape(-1)
    s = v.abs().amax(-1) / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return _to_int8(v * inv[:, None]), s


def npu_dequant_swiglu_quant(x: Tensor, *, weight_scale: Tensor | None = None, activation_scale: Tensor | None = None,
                             bias: Tensor | None = None, quant_scale: Tensor | None = None,
                             quant_offset: Tensor | None = None, group_index: Tensor | None = None,
                             activate_left: bool = False, quant_mode: int = 0, dst_type: int | None = None,
                             round_mode: int | None = None, activate_dim: int | None = None, swiglu_mode: int = 0,
                             clamp_limit: float = 7.0, glu_alpha: float = 1.702,
                             glu_bias: float = 1.0) -> tuple[Tensor, Tensor]:
    """Dequantise, SwiGLU, dynamic per-row int8 quant (vllm-ascend's w8a8 path after the first
    grouped matmul).

    x (T, 2H) int32 (grouped matmul's raw int32 output) or bf16.  For int32 x: weight_scale fp32
    (2H,) / (1, 2H), or (G, 2H) per group; activation_scale fp32 with T elements (per row).
    group_index (G,) int64 is per-group COUNTS (torch_npu docs: "当前只支持count模式"; the kernel
    reads group g's rows as the next group_index[g] rows; negative counts are skipped); with it
    2H % 64 == 0 and bias is None.  quant_scale: smooth scales (H,) / (G, H).
    activate_left=True: SiLU on the left half (out = silu(x[:, :H]) * x[:, H:]).
    swiglu_mode 1 / 2 (clamp_limit, glu_alpha, glu_bias) with group_index.
    Returns y (T, H) int8 and scale (T,) fp32; rows past sum(group_index) are left unwritten by
    the device (docs: garbage), here 0.  Only quant_mode 1 (dynamic) is emulated.
    """
    c = _Dsq(x, weight_scale, activation_scale, bias, quant_scale, quant_offset, group_index, activate_left,
             quant_mode, dst_type, round_mode, activate_dim, swiglu_mode, clamp_limit, glu_alpha, glu_bias)
    _dsq_check_attrs(c)
    groups = _dsq_check_tensors(c)
    _dsq_contract(c)
    if c.group_index is not None:
        return _dsq_grouped(c, groups)
    return _dsq_whole(c if c.swiglu_mode == 0 else dataclasses.replace(c, swiglu_mode=0))


def _dequant_swiglu_quant_fake(*args, **kwargs) -> tuple[Tensor, Tensor]:
    c = _Dsq(**bound_arguments(npu_dequant_swiglu_quant, args, kwargs))
    x = c.x
    _dsq_check_attrs(c)
    _dsq_check_tensors(c)
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


# ============================================================================ npu_moe_token_permute

def _permute_rows(tokens: Tensor, indices: Tensor, num_out_tokens: int | None, padded_mode: bool) -> int:
    """The checks of torch_npu (out-size function) and of the A2 / A3 tiling; returns the output rows."""
    _check(tokens.dim() == 2, f"npu_moe_token_permute: the dims of input tokens should be 2, got {tokens.dim()}")
    _check(indices.dim() in (1, 2), f"npu_moe_token_permute: the dims of input indices should be 2 or 1, "
                                    f"got {indices.dim()}")
    total = indices.numel()
    n = 0 if num_out_tokens is None else int(num_out_tokens)
    rows = min(n, total) if n > 0 else n + total
    _check(rows >= 0, f"npu_moe_token_permute: num_out_tokens {n} gives a negative output size {rows}")
    _check(tokens.dtype in _FLOATS,
           f"npu_moe_token_permute: tokens dtype must be float16, bfloat16 or float32, got {tokens.dtype}")
    _check(indices.dtype in (torch.int32, torch.int64),
           f"npu_moe_token_permute: indices dtype must be int32 or int64, got {indices.dtype}")
    _check(not padded_mode, "npu_moe_token_permute: currently only support padded_mode is false", TILING_ERROR)
    _check(tokens.shape[0] == indices.shape[0],
           f"npu_moe_token_permute: input token's dim 0 [{tokens.shape[0]}] should be same with indices' dim 0 "
           f"[{indices.shape[0]}]", TILING_ERROR)
    top_k = 1 if indices.dim() == 1 else indices.shape[1]
    _check(top_k <= _MAX_TOPK, f"npu_moe_token_permute: topK {top_k} should not be larger than {_MAX_TOPK}",
           TILING_ERROR)
    _check(total < _SORT_LIMIT, f"npu_moe_token_permute: the elements num of indices [{total}] should be less than "
                                f"[{_SORT_LIMIT}]", TILING_ERROR)
    return rows


def npu_moe_token_permute(tokens: Tensor, indices: Tensor, num_out_tokens: int | None = None,
                          padded_mode: bool = False) -> tuple[Tensor, Tensor]:
    """Expand tokens to their top-k choices and sort the T * K copies by expert.

    tokens (T, H) fp16 / bf16 / fp32; indices (T, K) or (T,) (K = 1) int32 / int64 expert ids.
    The flat choices (i = t * K + k) are sorted by expert with a STABLE sort (the kernel sorts the
    ids cast to fp32 with Sort32 / MrgSort, which keep equal keys in index order), p = the sorted
    position of choice i.  num_out_tokens n: None / 0 keeps all T * K rows, n > 0 the first
    min(n, T * K), n < 0 the first T * K + n (a negative size is an error).
    Returns permuted_tokens (rows, H) tokens.dtype, row p = tokens[src(p) // K], and
    sorted_indices (T * K,) int32 = p of each flat choice (dropped choices keep their p >= rows).
    padded_mode True: rejected by the A2 / A3 tiling.
    """
    rows = _permute_rows(tokens, indices, num_out_tokens, padded_mode)
    top_k = 1 if indices.dim() == 1 else indices.shape[1]
    keys = indices.reshape(-1).to(torch.float32)
    order = torch.sort(keys, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return tokens[order[:rows] // top_k].contiguous(), position.to(torch.int32)


def _moe_token_permute_fake(tokens: Tensor, indices: Tensor, num_out_tokens: int | None = None,
                            padded_mode: bool = False) -> tuple[Tensor, Tensor]:
    rows = _permute_rows(tokens, indices, num_out_tokens, padded_mode)
    return tokens.new_empty((rows, tokens.shape[1])), tokens.new_empty((indices.numel(),), dtype=torch.int32)


# ============================================================================ npu_moe_token_unpermute

def _unpermute_top_k(permuted_tokens: Tensor, sorted_indices: Tensor, probs: Tensor | None) -> int:
    if probs is not None:
        _check(probs.dim() == 2, f"npu_moe_token_unpermute: the dims of input probs should be 2, got {probs.dim()}")
    _check(permuted_tokens.dim() == 2,
           f"npu_moe_token_unpermute: the dims of input permuted_tokens should be 2, got {permuted_tokens.dim()}")
    _check(sorted_indices.dim() == 1,
           f"npu_moe_token_unpermute: the dims of input sorted_indices should be 1, got {sorted_indices.dim()}")
    top_k = 1 if probs is None else probs.shape[1]
    _check(top_k > 0, f"npu_moe_token_unpermute: the topk should be greater than zero, but got {top_k}")
    _check(permuted_tokens.dtype in _FLOATS,
           f"npu_moe_token_unpermute: permuted_tokens dtype must be float16, bfloat16 or float32, "
           f"got {permuted_tokens.dtype}")
    _check(sorted_indices.dtype == torch.int32,
           f"npu_moe_token_unpermute: sorted_indices dtype must be int32, got {sorted_indices.dtype}")
    if probs is not None:
        _check(probs.dtype in _FLOATS, f"npu_moe_token_unpermute: probs dtype must be float16, bfloat16 or float32, "
                                       f"got {probs.dtype}")
        _check(probs.numel() == sorted_indices.shape[0],
               f"npu_moe_token_unpermute: probs {tuple(probs.shape)} must be (tokens_num, topK) with tokens_num * "
               f"topK = len(sorted_indices) = {sorted_indices.shape[0]}")
    return top_k


def npu_moe_token_unpermute(permuted_tokens: Tensor, sorted_indices: Tensor, probs: Tensor | None = None,
                            padded_mode: bool = False, restore_shape: Sequence[int] | None = None) -> Tensor:
    """Gather each token's K rows back and sum them, weighted by probs.

    permuted_tokens (R, H) fp16 / bf16 / fp32; sorted_indices (T * K,) int32 (the permute's
    positions, choice t * K + k at sorted_indices[t * K + k]; values >= 0); probs (T, K)
    fp16 / bf16 / fp32 or None (K = 1).  out[t] = sum over k = 0..K-1 in order of
    fp32(row) * fp32(probs[t, k]), accumulated in fp32, rounded once to permuted_tokens.dtype;
    a choice whose index is >= R (dropped by num_out_tokens) or whose prob is 0 is skipped.
    Returns (T, H).  padded_mode and restore_shape: the A2 / A3 kernel never reads them
    (torch_npu documents only False / None); here ignored the same way.
    """
    top_k = _unpermute_top_k(permuted_tokens, sorted_indices, probs)
    rows, hidden = permuted_tokens.shape
    idx = sorted_indices.long().reshape(-1, top_k)
    _check(bool((idx >= 0).all()), "npu_moe_token_unpermute: sorted_indices must be >= 0")
    valid = idx < rows
    padded = torch.cat([permuted_tokens.float(), permuted_tokens.new_zeros((1, hidden), dtype=torch.float32)])
    terms = padded[torch.where(valid, idx, rows)]                       # (T, K, H) fp32
    if probs is not None:
        p = probs.float().reshape(-1, top_k)
        terms = terms * p[..., None]
        valid = valid & (p != 0)
    acc = torch.where(valid[:, 0, None], terms[:, 0], torch.zeros((), dtype=torch.float32))
    for k in range(1, top_k):                                          # in k order, skipping as the kernel does
        acc = torch.where(valid[:, k, None], acc + terms[:, k], acc)
    return acc.to(permuted_tokens.dtype)


def _moe_token_unpermute_fake(permuted_tokens: Tensor, sorted_indices: Tensor, probs: Tensor | None = None,
                              padded_mode: bool = False, restore_shape: Sequence[int] | None = None) -> Tensor:
    top_k = _unpermute_top_k(permuted_tokens, sorted_indices, probs)
    return permuted_tokens.new_empty((sorted_indices.shape[0] // top_k, permuted_tokens.shape[-1]))


# ============================================================================ npu_grouped_matmul

@dataclass(frozen=True)
class _Gmm:
    """One npu_grouped_matmul call: torch_npu's arguments, optional lists as None when empty,
    ``out`` the requested output dtype (None: x's), ``list_overload`` for ``.List``."""

    x: list[Tensor]
    weight: list[Tensor]
    bias: list[Tensor] | None
    scale: list[Tensor] | None
    offset: list[Tensor] | None
    antiquant: bool
    per_token_scale: list[Tensor] | None
    group_list: Tensor | list[int] | None
    activation: bool
    split_item: int
    group_type: int | None
    group_list_type: int
    act_type: int
    tuning_config: list[int] | None
    out: torch.dtype | None
    list_overload: bool

    @property
    def single_weight(self) -> bool:
        """One (E, K, N) weight for every group (never in the List overload, whose weights are 2-D)."""
        return len(self.weight) == 1 and self.weight[0].dim() == 3 and self.group_type != -1

    def w(self, g: int) -> Tensor:
        return self.weight[0][g] if self.single_weight else self.weight[g]

    def per_group(self, tensors: list[Tensor] | None, g: int) -> Tensor | None:
        """bias / scale of group g: row g of the one (E, N) tensor, or the g-th (N,) tensor."""
        if tensors is None:
            return None
        return tensors[0][g] if self.single_weight else tensors[g]


@dataclass(frozen=True)
class _GmmPlan:
    """What the call computes: ``kind`` "each" (y[i] = x[i] @ w[i]), "rows" (one output of
    row groups) or "split" (List overload: one output per row group of the one x); the output
    dtype, whether int8 x int8, the output shapes and the row-group count."""

    kind: str
    out: torch.dtype
    quant: bool
    shapes: list[tuple[int, ...]]
    groups: int


def _gmm_call(args: dict, list_overload: bool) -> _Gmm:
    """The bundle from the kernels' arguments (``locals()`` of a torch_npu-shaped function)."""
    op = "npu_grouped_matmul"
    for name in ("x_dtype", "weight_dtype", "scale_dtype", "per_token_scale_dtype"):
        _emulated(args.get(name) is None, f"{op} {name}={args.get(name)} (hifloat8 / mxfp4 / fp8 e8m0 inputs)")
    activation = any(args[n] for n in ("activation_input", "activation_quant_scale", "activation_quant_offset"))
    group_list = args["group_list"]
    if list_overload and group_list is not None:
        group_list = [int(v) for v in group_list]
    return _Gmm(x=list(args["x"]), weight=list(args["weight"]), bias=_tensors(args["bias"]),
                scale=_tensors(args["scale"]), offset=_tensors(args["offset"]),
                antiquant=bool(args["antiquant_scale"] or args["antiquant_offset"]),
                per_token_scale=_tensors(args["per_token_scale"]), group_list=group_list, activation=activation,
                split_item=0 if args["split_item"] is None else int(args["split_item"]),
                group_type=None if args["group_type"] is None else int(args["group_type"]),
                group_list_type=0 if args["group_list_type"] is None else int(args["group_list_type"]),
                act_type=0 if args["act_type"] is None else int(args["act_type"]),
                tuning_config=None if args.get("tuning_config") is None else list(args["tuning_config"]),
                out=_dtype_arg(args["output_dtype"], op, "output_dtype"), list_overload=list_overload)


def _gmm_check_lists(c: _Gmm) -> None:
    """torch_npu's check_dims, the aclnn list checks and the split_item range."""
    _check(len(c.x) > 0 and len(c.weight) > 0, "npu_grouped_matmul: neither x nor weight could be empty")
    _check(c.split_item in (0, 1, 2, 3), f"npu_grouped_matmul: invalid value of split_item [{c.split_item}], which "
                                         f"should only be one of 0/1/2/3")
    _check(len(c.x) <= _MAX_TENSOR_LIST and len(c.weight) <= _MAX_TENSOR_LIST,
           f"npu_grouped_matmul: length of tensorList should not exceed {_MAX_TENSOR_LIST}, got x {len(c.x)}, "
           f"weight {len(c.weight)}")
    _check(not c.activation, "npu_grouped_matmul: activation_input / activation_quant_scale / "
                             "activation_quant_offset only support None")
    if c.list_overload:
        num_w = len(c.weight)
        num_gl = 0 if c.group_list is None else len(c.group_list)
    else:
        num_w = c.weight[0].shape[0] if len(c.weight) == 1 and c.weight[0].dim() == 3 else len(c.weight)
        num_gl = 0 if c.group_list is None else (c.group_list.shape[0] if c.group_list.dim() else 1)
    if c.split_item in (0, 1):
        if num_gl > 0:
            _check(len(c.x) == 1 and num_w == num_gl,
                   f"npu_grouped_matmul: when split_item = 0 or 1 and group_list is not None, x must have one tensor "
                   f"and weight as many groups as group_list: x [{len(c.x)}], weight [{num_w}], group_list [{num_gl}]")
        else:
            _check(len(c.x) == num_w, f"npu_grouped_matmul: when split_item = 0 or 1 and group_list is None, the num "
                                      f"of x tensors must equal the num of weight tensors: x [{len(c.x)}], "
                                      f"weight [{num_w}]")
    x_dtypes, w_dtypes = {t.dtype for t in c.x}, {t.dtype for t in c.weight}
    _check(len(x_dtypes) == 1 and len(w_dtypes) == 1, "npu_grouped_matmul: every x (weight) tensor must have the "
                                                      "same dtype")
    if c.tuning_config:
        max_m = max(t.shape[0] for t in c.x)
        _check(0 <= c.tuning_config[0] <= max_m, f"npu_grouped_matmul: invalid tuning_config ({c.tuning_config[0]}), "
                                                 f"it should be in [0, {max_m}]")


def _gmm_dtypes(c: _Gmm) -> tuple[torch.dtype, bool]:
    """The output dtype and whether int8 x int8 (aclnn CheckFunctionParams, the docs' tables)."""
    xd, wd = c.x[0].dtype, c.weight[0].dtype
    out = c.out if c.out is not None else xd
    op = "npu_grouped_matmul"
    if xd in _FLOATS and wd == xd:
        _check(not (c.list_overload and xd == torch.float32),
               f"{op}: aclnnGroupedMatmul (int-list group_list) does not support x or weight dtype float32")
        _check(c.scale is None and c.offset is None and c.per_token_scale is None and not c.antiquant,
               f"{op}: detected nonquant (x and weight {xd}), but quant / antiquant inputs are not empty")
        _check(c.act_type == 0, f"{op}: non quant case does not support activation (act_type={c.act_type})")
        _check(out == xd, f"{op}: output_dtype {out} must equal x's dtype {xd} without quantisation")
        want = torch.float16 if xd == torch.float16 else torch.float32
        _check(c.bias is None or all(b.dtype == want for b in c.bias), f"{op}: bias dtype must be {want} for {xd} x")
        return out, False
    if xd == torch.int8 and wd == torch.int8:
        _emulated(c.act_type == 0, f"{op} act_type={c.act_type} (activation after quant)")
        _check(out in (torch.int8, torch.bfloat16, torch.float16, torch.int32),
               f"{op}: expect output dtype int8, int32, float16 or bfloat16 in quant case, got {out}")
        _check(c.bias is None or all(b.dtype in (torch.int32, torch.bfloat16) for b in c.bias),
               f"{op}: bias dtype does not match with required dtype int32 or bfloat16")
        _check(not c.antiquant, f"{op}: detected quant, but antiquant inputs are not empty")
        if out == torch.int32:
            _emulated(c.scale is None and c.per_token_scale is None, f"{op} int32 output with scale / per_token_scale")
            return out, True
        _check(c.scale is not None, f"{op}: scale must not be nullptr in quant, but now is nullptr")
        _check(c.offset is None, f"{op}: offset must be nullptr in quant, but now is not nullptr")
        _gmm_check_quant_dtypes(c, out)
        return out, True
    _emulated(not (xd in (torch.float16, torch.bfloat16) and wd in (torch.int8, torch.int32)),
              f"{op} antiquant (x {xd}, weight {wd})")
    _emulated(wd != torch.int32 and xd != torch.int32, f"{op} int4 (int32-packed) x / weight")
    _fail(f"{op}: there is no matching xDtype and weightDtype pattern: x dtype {xd} and weight dtype {wd}")


def _gmm_check_quant_dtypes(c: _Gmm, out: torch.dtype) -> None:
    op = "npu_grouped_matmul"
    if out == torch.int8:       # per-channel requant: the fp32 scale's bits in the low word of an int64 / uint64
        _check(all(s.dtype in (torch.int64, torch.uint64) for s in c.scale) and c.per_token_scale is None,
               f"{op}: int8 output needs an int64 / uint64 scale (the fp32 scale's bits in the low 32 bits) and no "
               f"per_token_scale; got scale {c.scale[0].dtype}")
        _check(c.bias is None or all(b.dtype == torch.int32 for b in c.bias),
               f"{op}: int8 output takes an int32 bias only")
        return
    want = torch.bfloat16 if out == torch.bfloat16 else torch.float32
    kind = "per-token" if c.per_token_scale is not None else "per-channel"
    _check(all(s.dtype == want for s in c.scale),
           f"{op}: {kind} quant supports scale bfloat16 with output bfloat16, or scale float32 with output float16; "
           f"got scale {c.scale[0].dtype} and output {out}")
    if c.per_token_scale is not None:
        _check(not c.list_overload, f"{op}: per_token_scale must be None with an int-list group_list (torch_npu docs)")
        _check(all(p.dtype == torch.float32 for p in c.per_token_scale),
               f"{op}: per-token quant case only supports per_token_scale with dtype float32")
    _emulated(c.bias is None or c.bias[0].dtype == torch.int32 or c.per_token_scale is not None,
              f"{op} bfloat16 bias without per_token_scale")


def _gmm_plan(c: _Gmm) -> _GmmPlan:
    """Validate what needs no tensor data and give the outputs' shapes (the fake and the kernel)."""
    if not c.list_overload:
        _gmm_group_type(c)
    _gmm_check_lists(c)
    out, quant = _gmm_dtypes(c)
    kind, shapes, groups = _gmm_layout_list(c) if c.list_overload else _gmm_layout(c)
    plan = _GmmPlan(kind, out, quant, shapes, groups)
    _gmm_check_params(c, plan)
    return plan


def _gmm_check_k(c: _Gmm, x_list: list[Tensor], weights: list[Tensor]) -> None:
    """K of x against each weight, and the inner-axis limit (x's K, weight's N)."""
    op = "npu_grouped_matmul"
    for i, w in enumerate(weights):
        x = x_list[i] if len(x_list) > 1 else x_list[0]
        _check(x.shape[-1] == w.shape[-2], f"{op}: k dim value of x ({x.shape[-1]}) and weight[{i}] "
                                           f"({w.shape[-2]}) is not matched")
        _check(x.shape[-1] <= _MAX_INNER_AXIS and w.shape[-1] <= _MAX_INNER_AXIS,
               f"{op}: x's K and weight's N should be less than or equal to {_MAX_INNER_AXIS}")


def _gmm_separate(c: _Gmm) -> tuple[str, list[tuple[int, ...]], int]:
    """group_type -1 (x[i] @ weight[i], each its own output)."""
    op = "npu_grouped_matmul"
    _check(c.split_item in (0, 1), f"{op}: when split_item is 2/3, group_type can not be -1")
    _check(len(c.x) == len(c.weight), f"{op}: when x and weight are separated, size of x {len(c.x)} should equal "
                                      f"to size of weight {len(c.weight)}")
    for i, (x, w) in enumerate(zip(c.x, c.weight)):
        _check(2 <= x.dim() <= 6, f"{op}: x[{i}] dimNum is {x.dim()}, but only support 2-6")
        _check(w.dim() == 2, f"{op}: weight[{i}] dimNum is {w.dim()}, but only support 2 when weight separated")
    _gmm_check_k(c, c.x, c.weight)
    return "each", [(*x.shape[:-1], w.shape[-1]) for x, w in zip(c.x, c.weight)], len(c.x)


def _gmm_rows_checks(c: _Gmm, weights: list[Tensor], weight_dim: int) -> int:
    """x 2-D, weights of weight_dim dims, one N; returns N."""
    op = "npu_grouped_matmul"
    _check(c.split_item in (2, 3), f"{op}: when y is not separated, split_item should be 2/3, got {c.split_item}")
    _check(all(x.dim() == 2 for x in c.x), f"{op}: x must be 2-D when groups split the M axis")
    _check(all(w.dim() == weight_dim for w in weights), f"{op}: weight must be {weight_dim}-D in this case")
    n = weights[0].shape[-1]
    _check(all(w.shape[-1] == n for w in weights), f"{op}: the N axis of every weight must be equal")
    _gmm_check_k(c, c.x, weights)
    return n


def _gmm_group_type(c: _Gmm) -> None:
    """torch_npu's first checks of the Tensor overload: group_type given, -1, 0 or 2."""
    op = "npu_grouped_matmul"
    _check(c.group_type is not None, f"{op}: Requires manual passing group_type, current is None.")
    _check(c.group_type in (-1, 0, 2), f"{op}: Use Tensor input with current cann version, The group type must be -1, "
                                       f"0 or 2, but now is [{c.group_type}]")


def _gmm_layout(c: _Gmm) -> tuple[str, list[tuple[int, ...]], int]:
    """The Tensor-group_list overload (aclnnGroupedMatmulV4 / V5): group_type -1 or 0."""
    op = "npu_grouped_matmul"
    gl = c.group_list
    if c.group_type == -1:
        _check(gl is None, f"{op}: group_list should be None when group_type is -1")
        return _gmm_separate(c)
    if c.group_type == 2:
        return _gmm_k_layout(c)
    _check(c.split_item in (2, 3), f"{op}: with group_type 0 and a Tensor group_list, only split_item 2/3 (one "
                                   f"output) is supported, got {c.split_item}")
    if len(c.x) == 1 and c.single_weight:
        n = _gmm_rows_checks(c, c.weight, 3)
        groups = c.weight[0].shape[0]
    elif len(c.x) == 1 and len(c.weight) > 1:
        n = _gmm_rows_checks(c, c.weight, 2)
        groups = len(c.weight)
    elif len(c.x) > 1 and len(c.weight) == len(c.x):
        n = _gmm_rows_checks(c, c.weight, 2)
        groups = len(c.x)
    else:
        _fail(f"{op}: group_type 0 with {len(c.x)} x and {len(c.weight)} weight tensors is not supported")
    if gl is None:
        _check(len(c.x) > 1, f"{op}: group_list (tensor) is required in this case, but get None")
    else:
        _check(c.group_list_type in (0, 1, 2), f"{op}: group_list_type must be 0, 1 or 2, got {c.group_list_type}")
        sparse = c.group_list_type == 2             # rows [group index, row count] (aclnnGroupedMatmulV4)
        want = (2, "(G, 2)") if sparse else (1, "1-D")
        _check(gl.dtype == torch.int64 and gl.dim() == want[0] and (not sparse or gl.shape[1] == 2),
               f"{op}: group_list must be a {want[1]} int64 tensor, got {gl.dtype} {tuple(gl.shape)}")
        _check(gl.shape[0] <= _MAX_GROUP_TENSOR, f"{op}: size of group_list {gl.shape[0]} should be less than or "
                                                 f"equal to {_MAX_GROUP_TENSOR}")
        if sparse:
            _check(gl.shape[0] > 1, f"{op}: a sparse group_list (group_list_type 2) needs more than one row")
        else:
            _check(gl.shape[0] == groups or groups == 1, f"{op}: size of group_list {gl.shape[0]} should be equal "
                                                         f"to the group count {groups}")
            _emulated(gl.shape[0] == groups, f"{op} with one weight group and a group_list of {gl.shape[0]} entries")
    return "rows", [(sum(x.shape[0] for x in c.x), n)], groups


def _gmm_k_layout(c: _Gmm) -> tuple[str, list[tuple[int, ...]], int]:
    """group_type 2 (K-axis groups, torch_npu's K_SPLIT): one x (M, K) whose K columns the
    group_list splits (cumulative ends, type 0, or counts, type 1); group g multiplies its columns
    by its rows of the weight: one (K, N) weight (split_item 2 / 3: one (G, M, N) output) or G
    weights (K_g, N_g) (split_item 0 / 1: G outputs (M, N_g)).  Float x only."""
    op = "npu_grouped_matmul"
    gl = c.group_list
    _check(len(c.x) == 1 and c.x[0].dim() == 2, f"{op}: K-axis groups (group_type 2) take one 2-D x")
    _check(gl is not None, f"{op}: group_list (tensor) is required when group_type is 2, but get None", PARAM_NULLPTR)
    _check(gl.dtype == torch.int64 and gl.dim() == 1 and 0 < gl.shape[0] <= _MAX_GROUP_TENSOR,
           f"{op}: group_list must be a 1-D int64 tensor of 1 to {_MAX_GROUP_TENSOR} entries, got {gl.dtype} "
           f"{tuple(gl.shape)}")
    _check(c.group_list_type in (0, 1), f"{op}: group_list_type must be 0 or 1 with K-axis groups, got "
                                        f"{c.group_list_type}")
    _emulated(c.bias is None and c.scale is None, f"{op} K-axis groups with bias / scale")
    m, k = c.x[0].shape
    groups = gl.shape[0]
    if c.split_item in (2, 3):
        _check(len(c.weight) == 1, f"{op}: When group_list is 2(K_SPLIT) and split_item is 2/3, the length of weight "
                                   f"must equal x.")
        w = c.weight[0]
        _check(w.dim() == 2 and w.shape[0] == k, f"{op}: the weight of K-axis groups must be (K={k}, N), got "
                                                 f"{tuple(w.shape)}")
        return "ksplit", [(groups, m, w.shape[1])], groups
    _check(len(c.weight) == groups and all(w.dim() == 2 for w in c.weight),
           f"{op}: K-axis groups with split_item 0/1 take one 2-D weight per group_list entry ({groups})")
    return "ksplit", [(m, w.shape[1]) for w in c.weight], groups


def _gmm_k_run(c: _Gmm, plan: _GmmPlan) -> list[Tensor]:
    """y_g = x[:, K_g] @ w_g for the K-axis groups (a group without columns gives zeros)."""
    x, values = c.x[0], c.group_list.long()
    ends = values.cumsum(0) if c.group_list_type == 1 else values
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    _check(bool((ends >= starts).all()) and int(ends[-1]) <= x.shape[1],
           f"npu_grouped_matmul: group_list {values.tolist()} must split x's K = {x.shape[1]} into non-negative groups")
    one = len(c.weight) == 1 and len(plan.shapes) == 1
    out = []
    for g, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        w = c.weight[0][a:b] if one else c.weight[g]
        _check(w.shape[0] == b - a, f"npu_grouped_matmul: weight[{g}] has {w.shape[0]} rows, its K group {b - a}")
        out.append(_gmm_block(x[:, a:b], w, None, None, None, plan.out))
    return [torch.stack(out)] if one else out


def _gmm_check_int_list(c: _Gmm, groups: int, rows: int | None) -> None:
    """An int-list group_list (aclnnGroupedMatmul): 1..128 non-negative increasing offsets, one
    per group, the last equal to x's rows when rows is given."""
    op = "npu_grouped_matmul"
    gl = c.group_list
    _check(len(gl) >= 1, f"{op}: size of group_list can not be 0")
    _check(len(gl) <= _MAX_TENSOR_LIST, f"{op}: size of group_list {len(gl)} should be less than or equal to "
                                        f"{_MAX_TENSOR_LIST}")
    _check(all(0 <= a <= b for a, b in zip([0] + gl, gl)), f"{op}: group_list should be non-negative and "
                                                           f"incremental, got {gl}")
    _check(len(gl) == groups or groups == 1, f"{op}: size of group_list {len(gl)} should be equal to groupNum {groups}")
    if rows is not None:
        _check(gl[-1] == rows, f"{op}: when split axis is M, the last value of group_list ({gl[-1]}) must equal x "
                               f"shape[0] ({rows})")


def _gmm_layout_list(c: _Gmm) -> tuple[str, list[tuple[int, ...]], int]:
    """The int-list group_list overload (aclnnGroupedMatmul, V1): the case follows from how many
    x, weight and output tensors there are; group_type, group_list_type and act_type are unused."""
    op = "npu_grouped_matmul"
    gl = c.group_list
    n_x, n_w = len(c.x), len(c.weight)
    n_y = (len(gl) if gl else n_x) if c.split_item in (0, 1) else 1
    _check(all(w.dim() == 2 for w in c.weight), f"{op}: only accept separated 2-D weights with an int-list group_list")
    _check(n_w > 1 or (n_x == 1 and n_y == 1), f"{op}: only accept separated weight, but input weight is not separated")
    if (n_x > 1 and n_y > 1) or (n_x == 1 and n_y == 1 and n_w == 1):
        kind, shapes, groups = _gmm_separate(c)
        if gl is not None:
            _gmm_check_int_list(c, n_x, None)
            _check(len(gl) == n_x, f"{op}: size of group_list {len(gl)} should be equal to size of x {n_x}")
            _check(all(x.dim() == 2 for x in c.x), f"{op}: group_list should be None when x has more than 2 dims")
            diffs = [b - a for a, b in zip([0] + gl, gl)]
            _check(diffs == [x.shape[0] for x in c.x], f"{op}: x's dim 0 values {[x.shape[0] for x in c.x]} should "
                                                       f"equal the group_list increments {diffs}")
        return kind, shapes, groups
    if n_x == 1 and n_w > 1 and n_y == 1:
        _check(gl is not None, f"{op}: group_list required in this case, but get nullptr", PARAM_NULLPTR)
        n = _gmm_rows_checks(c, c.weight, 2)
        _gmm_check_int_list(c, n_w, c.x[0].shape[0])
        return "rows", [(c.x[0].shape[0], n)], n_w
    if n_x == 1 and n_w > 1 and n_y > 1:
        _check(c.split_item in (0, 1), f"{op}: when y is separated, split_item should be 0/1")
        _check(all(x.dim() == 2 for x in c.x), f"{op}: x must be 2-D when groups split the M axis")
        _gmm_check_k(c, c.x, c.weight)
        _gmm_check_int_list(c, n_w, c.x[0].shape[0])
        diffs = [b - a for a, b in zip([0] + gl, gl)]
        return "split", [(d, w.shape[-1]) for d, w in zip(diffs, c.weight)], n_w
    if n_x > 1 and n_w == n_x and n_y == 1:
        n = _gmm_rows_checks(c, c.weight, 2)
        if gl is not None:
            _gmm_check_int_list(c, n_x, None)
            diffs = [b - a for a, b in zip([0] + gl, gl)]
            _check(diffs == [x.shape[0] for x in c.x], f"{op}: x's dim 0 values {[x.shape[0] for x in c.x]} should "
                                                       f"equal the group_list increments {diffs}")
        return "rows", [(sum(x.shape[0] for x in c.x), n)], n_x
    _fail(f"{op}: the case with {n_x} x, {n_w} weight and {n_y} output tensors is not supported")


def _gmm_check_params(c: _Gmm, plan: _GmmPlan) -> None:
    """bias / scale: one (E, N) tensor for an (E, K, N) weight, else one (N_i,) per weight;
    per_token_scale: one (M,) fp32 tensor, single x, weight and output only."""
    op = "npu_grouped_matmul"
    for name, tensors in (("bias", c.bias), ("scale", c.scale)):
        if tensors is None:
            continue
        _check(len(tensors) == len(c.weight), f"{op}: {name} size [{len(tensors)}] must be equal with weight size "
                                              f"[{len(c.weight)}]")
        if c.single_weight:
            e, n = c.weight[0].shape[0], c.weight[0].shape[-1]
            _check(tuple(tensors[0].shape) == (e, n), f"{op}: {name} shape must be {(e, n)}, got "
                                                      f"{tuple(tensors[0].shape)}")
        else:
            for i, (t, w) in enumerate(zip(tensors, c.weight)):
                _check(tuple(t.shape) == (w.shape[-1],), f"{op}: {name}[{i}] shape must be ({w.shape[-1]},), got "
                                                         f"{tuple(t.shape)}")
    if c.per_token_scale is not None:
        _check(len(c.x) == 1 and len(plan.shapes) == 1,
               f"{op}: per-token quant case is only supported when x and y are single tensors")
        pts = c.per_token_scale
        _check(len(pts) == 1 and pts[0].dim() == 1 and pts[0].shape[0] == c.x[0].shape[0],
               f"{op}: per_token_scale must be one 1-D tensor of x's {c.x[0].shape[0]} rows")
        _emulated(c.x[0].dim() == 2, f"{op} per_token_scale with {c.x[0].dim()}-D x")


def _gmm_block(x: Tensor, w: Tensor, bias: Tensor | None, scale: Tensor | None, pts: Tensor | None,
               out: torch.dtype) -> Tensor:
    """One matmul as the kernel computes it.  Float: fp32 accumulate, + bias, one rounding.
    int8: int32 accumulate (+ int32 bias, in int32); int32 out as is, else
    fp32(acc) * scale (per column) * per_token_scale (per row) (+ bf16 bias), one rounding."""
    if x.dtype != torch.int8:
        y = x.float() @ w.float()
        return (y if bias is None else y + bias.float()).to(out)
    acc = x.long() @ w.long()
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.long()
    acc = acc.to(torch.int32)
    if out == torch.int32:
        return acc
    if out == torch.int8:
        return _to_int8(acc.float() * _unpack_deq_scale(scale))
    y = acc.float() * scale.float()
    if pts is not None:
        y = y * pts.float()[:, None]
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.float()
    return y.to(out)


def _unpack_deq_scale(scale: Tensor) -> Tensor:
    """An int64 / uint64 dequant scale (int8 output): the fp32 whose bits are the low 32 bits."""
    low = scale.to(torch.int64) & 0xFFFFFFFF
    return torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32).view(torch.float32)


def _gmm_segments(c: _Gmm, groups: int) -> list[tuple[int, int, int]]:
    """(group, start row, row count) of each run of rows of the one x, from a Tensor group_list
    (kernel data): cumulative ends (type 0), counts (1), or [group, count] rows (2, sparse)."""
    op = "npu_grouped_matmul"
    rows = c.x[0].shape[0]
    values = c.group_list.tolist()
    if c.group_list_type == 2:
        order = [int(g) for g, _ in values]
        counts = [int(n) for _, n in values]
        _check(all(0 <= g < groups for g in order), f"{op}: sparse group_list group indices {order} must lie in "
                                                    f"[0, {groups})")
        _check(all(n >= 0 for n in counts), f"{op}: sparse group_list counts must be non-negative, got {counts}")
    else:
        values = [int(v) for v in values][:groups]
        order = list(range(len(values)))
        if c.group_list_type == 0:
            _check(all(0 <= a <= b for a, b in zip([0] + values, values)),
                   f"{op}: group_list (cumulative, group_list_type 0) must be non-negative and non-decreasing, "
                   f"got {values}")
            counts = [b - a for a, b in zip([0] + values, values)]
        else:
            _check(all(v >= 0 for v in values), f"{op}: group_list (counts, group_list_type 1) must be "
                                                f"non-negative, got {values}")
            counts = values
    _check(sum(counts) <= rows, f"{op}: group_list covers {sum(counts)} rows, more than x's {rows}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return list(zip(order, starts, counts))


def _gmm_run(c: _Gmm, plan: _GmmPlan) -> list[Tensor]:
    pts = c.per_token_scale[0] if c.per_token_scale is not None else None
    if plan.kind == "ksplit":
        return _gmm_k_run(c, plan)
    if plan.kind == "each":
        return [_gmm_block(x, c.weight[i], c.per_group(c.bias, i), c.per_group(c.scale, i), pts, plan.out)
                for i, x in enumerate(c.x)]
    if plan.kind == "split":
        gl = c.group_list
        return [_gmm_block(c.x[0][a:b], c.weight[g], c.per_group(c.bias, g), c.per_group(c.scale, g), None, plan.out)
                for g, (a, b) in enumerate(zip([0] + gl[:-1], gl))]
    if len(c.x) > 1:
        if isinstance(c.group_list, Tensor):
            values = [int(v) for v in c.group_list.tolist()]
            sizes = values if c.group_list_type == 1 else [b - a for a, b in zip([0] + values, values)]
            _check(sizes == [x.shape[0] for x in c.x], f"npu_grouped_matmul: group_list {values} must match x's "
                                                       f"rows {[x.shape[0] for x in c.x]}")
        return [torch.cat([_gmm_block(x, c.w(g), c.per_group(c.bias, g), c.per_group(c.scale, g), None, plan.out)
                           for g, x in enumerate(c.x)])]
    x = c.x[0]
    if c.list_overload:
        segments = [(g, a, b - a) for g, (a, b) in enumerate(zip([0] + c.group_list[:-1], c.group_list))]
    else:
        segments = _gmm_segments(c, plan.groups)
    y = torch.zeros(plan.shapes[0], dtype=plan.out)
    for g, start, n in segments:
        if n:
            rows = slice(start, start + n)
            y[rows] = _gmm_block(x[rows], c.w(g), c.per_group(c.bias, g), c.per_group(c.scale, g),
                                 None if pts is None else pts[rows], plan.out)
    return [y]


def npu_grouped_matmul(x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
                       scale: list[Tensor] | None = None, offset: list[Tensor] | None = None,
                       antiquant_scale: list[Tensor] | None = None, antiquant_offset: list[Tensor] | None = None,
                       per_token_scale: list[Tensor] | None = None, group_list: Tensor | None = None,
                       activation_input: list[Tensor] | None = None,
                       activation_quant_scale: list[Tensor] | None = None,
                       activation_quant_offset: list[Tensor] | None = None, split_item: int | None = 0,
                       group_type: int | None = None, group_list_type: int | None = 0, act_type: int | None = 0,
                       tuning_config: list[int] | None = None, output_dtype: int | None = None,
                       x_dtype: int | None = None, weight_dtype: int | None = None, scale_dtype: int | None = None,
                       per_token_scale_dtype: int | None = None) -> list[Tensor]:
    """Grouped matmul (Tensor group_list overload, aclnnGroupedMatmulV4 / V5).

    group_type -1 (split_item 0/1, group_list None): y[i] = x[i] @ weight[i] (+ bias[i]); x[i]
    (..., K_i) 2-6 dims, weight[i] (K_i, N_i) 2-D; outputs (..., N_i).
    group_type 0 (split_item 2/3, one output (M, N)): one x (M, K) with weight one (E, K, N)
    tensor or a list of (K, N), group_list int64 required: group_list_type 0 (E,) cumulative
    row ends, 1 (E,) row counts, 2 (G, 2) rows [expert, row count] taking the rows in turn (the
    sparse form, e.g. init_routing_v2's key-value expert_tokens; [0, 0] rows add nothing); or
    several x[i] (M_i, K) with as many weights (group_list optional, matching their rows).
    Rows past the last group: the kernel leaves them unwritten (torch_npu allocates M rows
    uninitialised); here 0.
    Float x (fp16 / bf16 / fp32, weight the same dtype): fp32 accumulation + bias (fp16 for
    fp16 x, fp32 otherwise), one rounding; output x's dtype.
    int8 x, int8 weight: int32 accumulation (+ int32 bias); output_dtype int32 (code 3) gives
    the accumulator; bf16 (15) needs bf16 scale, fp16 (5) fp32 scale (per output column,
    (E, N) or (N_i,) each), optional per_token_scale [(M,)] fp32 per row:
    y = fp32(acc) * scale * per_token_scale (+ bf16 bias), one rounding; output_dtype None (x's
    dtype, int8): per-channel requant with an int64 / uint64 scale (the fp32 scale's bits in the
    low word), int8(rint(fp32(acc) * scale)) saturated.
    group_type 2 (K-axis groups, float x): one x (M, K), group_list splitting K; one (K, N)
    weight and split_item 2/3 give (G, M, N), G weights and split_item 0/1 give G outputs.
    Not emulated (NotImplementedError): antiquant, int4, activations.
    Returns a list: one tensor (split_item 2/3) or one per x / group (split_item 0/1).
    """
    c = _gmm_call(locals(), list_overload=False)
    return _gmm_run(c, _gmm_plan(c))


def _grouped_matmul_fake(*args, **kwargs) -> list[Tensor]:
    c = _gmm_call(bound_arguments(npu_grouped_matmul, args, kwargs), list_overload=False)
    plan = _gmm_plan(c)
    return [c.x[0].new_empty(s, dtype=plan.out) for s in plan.shapes]


def npu_grouped_matmul_list(x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
                            scale: list[Tensor] | None = None, offset: list[Tensor] | None = None,
                            antiquant_scale: list[Tensor] | None = None,
                            antiquant_offset: list[Tensor] | None = None,
                            per_token_scale: list[Tensor] | None = None, group_list: list[int] | None = None,
                            activation_input: list[Tensor] | None = None,
                            activation_quant_scale: list[Tensor] | None = None,
                            activation_quant_offset: list[Tensor] | None = None, split_item: int | None = 0,
                            group_type: int | None = None, group_list_type: int | None = 0,
                            act_type: int | None = 0, output_dtype: torch.dtype | None = None) -> list[Tensor]:
    """``npu_grouped_matmul.List``: group_list as int cumulative row offsets (aclnnGroupedMatmul).

    The case follows from the tensor counts (torch_npu passes neither group_type,
    group_list_type nor act_type to the kernel): x, weight and outputs all separated (or all
    single) -> y[i] = x[i] @ weight[i]; one x (M, K) with weights [(K, N)] * G -> one output
    (split_item 2/3) or G outputs of group_list's increments (split_item 0/1), group_list
    required (non-negative, increasing, last = M, at most 128); several x with as many weights
    -> one output of their rows.  Weights are 2-D; float32 x and per_token_scale are rejected.
    Numerics as :func:`npu_grouped_matmul`; output_dtype a torch.dtype (default x's).
    """
    c = _gmm_call(dict(locals(), tuning_config=None), list_overload=True)
    return _gmm_run(c, _gmm_plan(c))


def _grouped_matmul_list_fake(*args, **kwargs) -> list[Tensor]:
    c = _gmm_call(dict(bound_arguments(npu_grouped_matmul_list, args, kwargs), tuning_config=None), list_overload=True)
    plan = _gmm_plan(c)
    return [c.x[0].new_empty(s, dtype=plan.out) for s in plan.shapes]


# ============================================================================ registry entries

KERNELS: dict[str, tuple[Callable, Callable]] = {
    "npu_grouped_matmul": (npu_grouped_matmul, _grouped_matmul_fake),
    "npu_grouped_matmul.List": (npu_grouped_matmul_list, _grouped_matmul_list_fake),
    "npu_swiglu": (npu_swiglu, _swiglu_fake),
    "npu_dequant_swiglu_quant": (npu_dequant_swiglu_quant, _dequant_swiglu_quant_fake),
    "npu_moe_token_permute": (npu_moe_token_permute, _moe_token_permute_fake),
    "npu_moe_token_unpermute": (npu_moe_token_unpermute, _moe_token_unpermute_fake),
    "npu_dynamic_quant": (npu_dynamic_quant, _dynamic_quant_fake),
}
