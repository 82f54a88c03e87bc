"""Row packing: several per-row tensors of mixed dtypes <-> one uint8 matrix (n, B).

One ``all_to_all_single`` then moves payload rows, triples and scales together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    """One column group of a packed row: ``width`` elements of ``dtype``."""

    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * torch.empty(0, dtype=self.dtype).element_size()


def row_bytes(fields: list[Field]) -> int:
    return sum(f.nbytes for f in fields)


def pack(parts: list[torch.Tensor], fields: list[Field]) -> torch.Tensor:
    """parts[i]: (n, fields[i].width) of fields[i].dtype -> (n, row_bytes) uint8."""
    n = parts[0].shape[0] if parts else 0
    if n == 0:                                # empty tensors may carry 0 strides: no views
        return torch.empty(0, row_bytes(fields), dtype=torch.uint8)
    cols = [p.reshape(n, f.width).to(f.dtype).contiguous().view(torch.uint8).reshape(n, f.nbytes)
            for p, f in zip(parts, fields)]
    return torch.cat(cols, dim=1)


def unpack(buf: torch.Tensor, fields: list[Field]) -> list[torch.Tensor]:
    """(n, row_bytes) uint8 -> list of (n, width) tensors of each field's dtype."""
    n = buf.shape[0]
    if n == 0:
        return [torch.empty(0, f.width, dtype=f.dtype) for f in fields]
    out, off = [], 0
    for f in fields:
        chunk = buf[:, off:off + f.nbytes].contiguous()
        out.append(chunk.view(f.dtype).reshape(n, f.width))
        off += f.nbytes
    return out
