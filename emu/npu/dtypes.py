"""torch_npu's own dtype names: ``torch_npu.hifloat8``, ``torch_npu.float4_e2m1fn_x2``, ...

In torch_npu 2.14.0 they are the static attributes of ``torch_npu._C._cd.DType`` that
``torch_npu/_init/core/_exports.py`` (``_export_dtype_symbols``) copies onto the ``torch_npu``
module.  Each is a plain Python ``int``: aclDataType's value plus 256 (``c10_npu::DType``, the
offset that tells them from torch's ScalarType codes, which stay below 256).  They are passed
where a schema takes ``int? x_dtype`` / ``tokens_dtype`` / ``dst_type`` / ``y_dtype``; the
adapters turn them into aclDataType (``c10_npu::GetAclDataType``: value - 256 for codes >= 256,
the ScalarType's aclDataType below).

The values were read from the wheel's ``libtorch_npu.so`` (the table ``custom_dtype_functions``
builds, each name with its ``c10_npu::DType`` constant) and agree with the meta functions'
``TORCH_NPU_DTYPE_TO_STRING_MAP`` (285 int4, 290 hifloat8, 293 float8_e8m0fnu, 296 / 297 the
float4 pairs) and ``TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP`` (291 / 292 the fp8 dtypes).
"""
from __future__ import annotations

import types

import torch

from ..core.inputs import NPU_DTYPE_CODES

#: torch_npu 2.14.0's ``torch_npu.<name>`` -> its code (``int``), in c10_npu::DType's order.
NPU_DTYPES: dict[str, int] = {
    "float32": 256, "float16": 257, "int8": 258, "int32": 259, "uint8": 260, "int16": 262,
    "uint16": 263, "uint32": 264, "int64": 265, "uint64": 266, "float64": 267, "bool": 268,
    "string": 269, "complex64": 272, "complex128": 273, "bfloat16": 283, "int4": 285, "uint1": 286,
    "complex32": 289, "hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292, "float8_e8m0fnu": 293,
    "float6_e3m2": 294, "float6_e2m3": 295, "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297,
}

#: The offset of torch_npu's codes over aclDataType (``c10_npu::DType``).
ACL_OFFSET = 256

# torch's sub-byte int4 / uint1 dtypes are not these (torch_npu packs int4 two to a byte and stores
# it as uint8, as its meta functions allocate it)
_NO_EQUIVALENT = ("int4", "uint1")
_TORCH_EQUIVALENT = {name: getattr(torch, name) for name in NPU_DTYPES
                     if name not in _NO_EQUIVALENT and isinstance(getattr(torch, name, None), torch.dtype)}

#: torch_npu code -> the torch dtype of the same element type, where torch has one (the codes of
#: int4, uint1, hifloat8, string, the float6 and float4 types have none).
TORCH_OF_CODE: dict[int, torch.dtype] = {NPU_DTYPES[name]: dt for name, dt in _TORCH_EQUIVALENT.items()}

#: code -> its name as torch_npu prints it (``torch_npu.hifloat8``), for messages.
NAME_OF_CODE: dict[int, str] = {code: f"torch_npu.{name}" for name, code in NPU_DTYPES.items()}


def attach(module: types.ModuleType) -> None:
    """Put every dtype name on ``module`` (the drop-in ``torch_npu``) as torch_npu does."""
    for name, code in NPU_DTYPES.items():
        setattr(module, name, code)


def torch_dtype(code: int | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype an ``int?`` dtype argument names: torch's ScalarType code (below 256, e.g.
    15 bfloat16) or a torch_npu code (256 and up, e.g. ``torch_npu.bfloat16`` 283) of a dtype torch
    has; None for None and for the codes of dtypes torch lacks (hifloat8, float4, int4, ...)."""
    if code is None or isinstance(code, torch.dtype):
        return code
    code = int(code)
    return TORCH_OF_CODE.get(code) if code >= ACL_OFFSET else NPU_DTYPE_CODES.get(code)


def dtype_name(code: int | torch.dtype | None) -> str:
    """A dtype argument as torch_npu names it in messages (``torch_npu.hifloat8``, ``torch.int8``)."""
    if code is None or isinstance(code, torch.dtype):
        return str(code)
    code = int(code)
    if code in NAME_OF_CODE:
        return NAME_OF_CODE[code]
    known = torch_dtype(code)
    return str(known) if known is not None else str(code)
