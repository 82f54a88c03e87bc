"""Assertions MoE tests make about every rank's outcome."""
from __future__ import annotations

import torch

from ..core.errors import ErrorKind
from .harness import Outcome


def assert_all_raise(outcomes: list[Outcome], code: int | None = None, kind: ErrorKind | None = None,
                     type_name: str | None = None, culprits: tuple[int, ...] | None = None) -> None:
    """Every rank raised; with ``code`` an AclnnError of that code, with ``kind`` / ``culprits``
    those, with ``type_name`` an exception of that class (or a subclass)."""
    for o in outcomes:
        assert o.error is not None, f"rank {o.rank} " + ("returned" if o.ok else f"exited ({o.exit_code})") \
            + " instead of raising"
        e = o.error
        assert code is None or e.code == code, f"rank {o.rank} raised {e.type_name} code {e.code}, want {code}: " \
            f"{e.message}"
        assert kind is None or e.kind == kind, f"rank {o.rank} raised kind {e.kind}, want {kind}: {e.message}"
        assert type_name is None or e.is_a(type_name), f"rank {o.rank} raised {e.type_name}, want {type_name}"
        assert culprits is None or e.culprits == tuple(culprits), \
            f"rank {o.rank} blames {e.culprits}, want {tuple(culprits)}: {e.message}"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_on_all_ranks(outcomes: list[Outcome]) -> None:
    """Every rank returned, and every value equals rank 0's (tensors bit for bit, with shape and dtype)."""
    values = [o.get() for o in outcomes]
    for r, v in enumerate(values[1:], start=1):
        assert _same(v, values[0]), f"rank {r}'s value differs from rank 0's"
