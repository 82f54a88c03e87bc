"""torch_npu's storage formats, which the CPU does not have: every npu tensor is in ND (format 2).

``npu_format_cast`` (to a format code, or ``.Tensor``: to another tensor's format) returns a
copy in the same layout (the schema declares a new tensor, so the result never aliases its
input); ``get_npu_format`` answers 2.
"""
from __future__ import annotations

import torch

ACL_FORMAT_ND = 2


def npu_format_cast(self: torch.Tensor, *target, customize_dtype: int | None = None,
                    input_dtype: int | None = None) -> torch.Tensor:
    """A copy of ``self``: on the CPU every format (NZ 29, ND 2, another tensor's) is the plain layout."""
    return self.clone()


def _format_cast_fake(self: torch.Tensor, *target, **kwargs) -> torch.Tensor:
    return torch.empty_like(self)


def get_npu_format(self: torch.Tensor) -> int:
    return ACL_FORMAT_ND


#: schema name -> (kernel on CPU tensors, fake kernel), for :mod:`emu.npu.registry`.
KERNELS = {
    "npu_format_cast": (npu_format_cast, _format_cast_fake),
    "npu_format_cast.Tensor": (npu_format_cast, _format_cast_fake),
    "get_npu_format": (get_npu_format, get_npu_format),
}
