"""A communication domain of one call (EP, TP, or A2's INTER / INTRA), and the transport seam.

The operator computes with *logical* ids (the EP rank, or under elastic scaling the new id);
a :class:`Domain` maps them to global ranks, and moves bytes with one ``all_to_all_single`` on
the emulator's own gloo group of the same members (never on the user's group).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..core.env import getenv
from .groups import group_label, group_ranks, own_generation, own_group, own_group_name


_OF_GROUP: "weakref.WeakKeyDictionary[ProcessGroup, dict[str, Domain]]" = weakref.WeakKeyDictionary()


def timeout_s() -> float:
    """Per-collective timeout in seconds (env ``EMU_TIMEOUT_S``, default 60)."""
    try:
        return float(getenv("EMU_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0


@dataclass
class Domain:
    """One communication domain of a call, seen in *logical* ids.

    Logical id i is the EP (or TP) rank the operator computes with: the user group's rank, or
    under elastic scaling the new local id.  ``ranks[i]`` is the global rank of logical id i,
    ``ep_index[i]`` its original EP rank.  Collectives run on the emulator's own group of the
    same members (:func:`~emu.comm.groups.own_group`, made on first use), whose ranks follow
    the global ranks: ``order[i]`` is the own group's rank of logical id i (None: the identity).
    ``name`` labels the domain in traces and flight records (the user's group name for EP/TP).
    """

    kind: str                     # "EP", "TP", "INTER" or "INTRA"
    rank: int
    size: int
    ranks: list[int]
    order: np.ndarray | None = None
    ep_index: np.ndarray | None = None
    name: str = ""
    prefix: str = "group"         # names the emulator's own group of these members

    @classmethod
    def of_members(cls, kind: str, ranks: list[int], rank: int, ep_index: np.ndarray, name: str = "",
                   prefix: str = "group") -> "Domain":
        """A domain of the global ``ranks`` (logical order); ``rank``: this rank's logical id."""
        members = sorted(ranks)
        order = np.array([members.index(g) for g in ranks], dtype=np.int64)
        return cls(kind=kind, rank=rank, size=len(ranks), ranks=list(ranks),
                   order=None if bool((order == np.arange(order.size)).all()) else order,
                   ep_index=np.asarray(ep_index, dtype=np.int64), name=name, prefix=prefix)

    @classmethod
    def of(cls, kind: str, pg: ProcessGroup) -> "Domain":
        """The domain of the user's group ``pg`` (its own group is made on first use); a group's
        members never change, so it is read once per group object (held weakly)."""
        known = _OF_GROUP.setdefault(pg, {})
        if kind not in known:
            known[kind] = cls.of_members(kind, group_ranks(pg), dist.get_rank(pg), np.arange(dist.get_world_size(pg)),
                                         name=group_label(pg))
        return replace(known[kind])            # a call's own copy: binding renames it

    @classmethod
    def subset(cls, kind: str, full: "Domain", members: list[int]) -> "Domain":
        """A domain of the EP ranks ``members`` (ascending) of ``full``."""
        dom = cls.of_members(kind, [full.ranks[m] for m in members], members.index(full.rank), members,
                             prefix=kind.lower())
        dom.name = ""
        return dom.bind()

    @classmethod
    def survivors(cls, full: "Domain", old_ep_ranks: np.ndarray, my_new_id: int) -> "Domain":
        """The EP domain of an elastic call: new id i = original EP rank ``old_ep_ranks[i]``."""
        dom = cls.of_members("EP", [full.ranks[int(r)] for r in old_ep_ranks], my_new_id, old_ep_ranks,
                             prefix="survivors")
        dom.name = ""
        return dom

    def bind(self) -> "Domain":
        """Name the domain after the current generation of its own group (not built here): call
        numbers, slots and flight records live under the name, so a group a member abandoned
        starts afresh on every member (docs/errors.md)."""
        name, gen = own_generation(self.ranks, self.prefix)
        if not self.name or self.name == own_group_name(self.ranks, self.prefix):
            self.name = name                                  # the emulator's own domain: its group's name
        elif gen:
            self.name = f"{self.name.split('~')[0]}~g{gen}"
        return self

    def backend(self) -> ProcessGroup:
        """The emulator's own gloo group of this domain's members (made on first use).  Looked
        up, never held: the per-process registry must be its only owner, so that it is released
        at exit even when a user keeps an emulator error (and its traceback's frames)."""
        return own_group(self.ranks, timeout_s(), self.prefix).pg

    def backend_name(self) -> str:
        return own_group_name(self.ranks, self.prefix)

    def describe(self) -> str:
        return f"{self.kind} group {self.name} (ranks {self.ranks})"

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                   in_splits: list[int] | None):
        """Start an all_to_all_single on this domain; returns the Work (the transport seam)."""
        return self.backend().alltoall_base(out, inp, out_splits or [], in_splits or [], dist.AllToAllOptions())

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
