"""A communication domain of one call (EP, TP, or A2's INTER / INTRA), and the transport seam.

The operator computes with *logical* ids (the EP rank, or under elastic scaling the new id);
a :class:`Domain` maps them to the group's ranks and global ranks, and moves bytes with one
``all_to_all_single`` on either a registered ``ProcessGroup`` or a bare backend object the
emulator built itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .groups import group_label, group_ranks, survivor_group


def timeout_s() -> float:
    """Per-collective timeout in seconds (env ``EMU_TIMEOUT_S``, default 60)."""
    try:
        return float(os.environ.get("EMU_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0


@dataclass
class Domain:
    """One communication domain of a call, seen in *logical* ids.

    Logical id i is the EP (or TP) rank the operator computes with: the group rank, or under
    elastic scaling the new local id.  ``order[i]`` is the group rank of logical id i (None:
    the identity), ``ranks[i]`` its global rank, ``ep_index[i]`` its original EP rank.
    """

    kind: str                     # "EP", "TP", "INTER" or "INTRA"
    pg: ProcessGroup
    rank: int
    size: int
    ranks: list[int] = field(default_factory=list)
    order: np.ndarray | None = None
    ep_index: np.ndarray | None = None
    name: str = ""
    bare: bool = False            # a backend object not registered with torch.distributed

    @classmethod
    def of(cls, kind: str, pg: ProcessGroup) -> "Domain":
        size = dist.get_world_size(pg)
        return cls(kind=kind, pg=pg, rank=dist.get_rank(pg), size=size, ranks=group_ranks(pg),
                   ep_index=np.arange(size), name=group_label(pg))

    @classmethod
    def subset(cls, kind: str, full: "Domain", members: list[int]) -> "Domain":
        """A domain of the EP ranks ``members`` (ascending), made by them alone (bare gloo)."""
        globals_ = [full.ranks[m] for m in members]
        pg, name = survivor_group(globals_, timeout_s(), prefix=kind.lower())
        return cls(kind=kind, pg=pg, rank=members.index(full.rank), size=len(members), ranks=globals_,
                   ep_index=np.asarray(members, dtype=np.int64), name=name, bare=True)

    @classmethod
    def survivors(cls, full: "Domain", old_ep_ranks: np.ndarray, my_new_id: int) -> "Domain":
        """The EP domain of an elastic call: new id i = original EP rank ``old_ep_ranks[i]``."""
        globals_ = [full.ranks[int(r)] for r in old_ep_ranks]
        pg, name = survivor_group(globals_, timeout_s())
        members = sorted(globals_)
        order = np.array([members.index(g) for g in globals_], dtype=np.int64)
        return cls(kind="EP", pg=pg, rank=my_new_id, size=len(globals_), ranks=globals_,
                   order=None if bool((order == np.arange(order.size)).all()) else order,
                   ep_index=np.asarray(old_ep_ranks, dtype=np.int64), name=name, bare=True)

    def describe(self) -> str:
        return f"{self.kind} group {self.name} (ranks {self.ranks})"

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                   in_splits: list[int] | None):
        """Start an all_to_all_single on this domain; returns the Work (the transport seam)."""
        if self.bare:
            return self.pg.alltoall_base(out, inp, out_splits or [], in_splits or [], dist.AllToAllOptions())
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.pg, async_op=True)

    def to_group(self, per_logical: np.ndarray) -> np.ndarray:
        """Reorder an array indexed by logical id into group-rank order."""
        if self.order is None:
            return per_logical
        out = np.empty_like(per_logical)
        out[self.order] = per_logical
        return out

    def from_group(self, per_group: np.ndarray) -> np.ndarray:
        """Reorder an array indexed by group rank into logical-id order."""
        return per_group if self.order is None else per_group[self.order]

    def group_to_logical(self) -> np.ndarray:
        """Logical id of each group rank."""
        return np.argsort(self.order) if self.order is not None else np.arange(self.size)
