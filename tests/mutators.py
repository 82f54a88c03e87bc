"""Named mutators for the error tables: each derives a bad argument from a rank's good
keyword arguments ``kw``.  ``derive(fn, *args)`` binds the leading arguments; the result is
picklable, so it travels to the worker processes, which call it with ``kw``."""
from __future__ import annotations

from functools import partial

import torch


def derive(fn, *args) -> partial:
    return partial(fn, *args)


def cast(name: str, dtype: torch.dtype, kw: dict) -> torch.Tensor:
    return kw[name].to(dtype)


def first_columns(name: str, n: int, kw: dict) -> torch.Tensor:
    return kw[name][:, :n]


def first_rows(name: str, n: int, kw: dict) -> torch.Tensor:
    return kw[name][:n]


def add(name: str, value: int, kw: dict) -> torch.Tensor:
    return kw[name] + value


def squeeze_middle(name: str, kw: dict) -> torch.Tensor:
    """(a, 1, b) -> (a, b)."""
    return kw[name][:, 0]


def extra_dim(name: str, kw: dict) -> torch.Tensor:
    return kw[name][None]


def widen(name: str, columns: int, kw: dict) -> torch.Tensor:
    """Append the first ``columns`` columns again (a larger H)."""
    return torch.cat([kw[name], kw[name][:, :columns]], 1)


def first_slot_id(value: int, kw: dict) -> torch.Tensor:
    """Every token's first expert id replaced by ``value``."""
    ids = kw["expert_ids"]
    return torch.cat([ids[:, :1] * 0 + value, ids[:, 1:]], 1)


def first_slot_twice(kw: dict) -> torch.Tensor:
    """Every token picks its first expert twice."""
    return kw["expert_ids"][:, :1].repeat(1, 2)


def elastic_field(index: int, value: int, kw: dict) -> torch.Tensor:
    """elastic_info with entry ``index`` replaced."""
    info = kw["elastic_info"].clone()
    info[index] = value
    return info


def elastic_tables(to_old_tail: list[int], kw: dict) -> torch.Tensor:
    """elastic_info with its last entries (table 2) replaced."""
    info = kw["elastic_info"]
    return torch.cat([info[:info.numel() - len(to_old_tail)], torch.tensor(to_old_tail, dtype=torch.int32)])
