"""Expert -> rank placement (docs/dispatch.md).

EP ranks ``0 .. S-1`` host shared experts (shared expert ``j`` on ranks ``[j*R, (j+1)*R)``),
ranks ``S .. W-1`` host MoE experts (expert ``e`` on rank ``S + e // L`` as local expert
``e % L``).  A source rank ``r`` sends each active token to one replica of every shared
expert: rank ``r % R + j*R``.  All functions are vectorised over numpy int64 arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .attrs import Geometry


def moe_rank_of(geom: Geometry, expert: np.ndarray) -> np.ndarray:
    """EP rank hosting each MoE expert id (int64, same shape)."""
    return geom.S + expert // geom.L


def moe_local_of(geom: Geometry, expert: np.ndarray) -> np.ndarray:
    """Local expert index of each MoE expert id on its rank."""
    return expert % geom.L


def shared_replica(geom: Geometry, src: int, j: np.ndarray | int) -> np.ndarray | int:
    """EP rank of the replica of shared expert ``j`` that source ``src`` sends to."""
    if not geom.R:
        return j                  # no shared experts: only ever called with an empty j
    return src % geom.R + j * geom.R


def shared_expert_of(geom: Geometry, rank: int) -> int:
    """Index ``j`` of the shared expert hosted by shared rank ``rank``."""
    return rank // geom.R


def shared_sources(geom: Geometry, rank: int) -> np.ndarray:
    """Source ranks whose tokens shared rank ``rank`` receives (ascending)."""
    src = np.arange(geom.W)
    return src[src % geom.R == rank % geom.R]


@dataclass(frozen=True)
class Remap:
    """``elastic_info`` (int32, length 4 + 2*W) parsed (docs/elastic.md).

    active: flag != 0 (flag 0: tables ignored, only the elastic shape rules apply);
    new_world W', new_shared S', new_moe E'; to_new (W,) original EP rank -> new id or -1;
    to_old (W,) new id -> original EP rank (entries >= W' unused).
    """

    active: bool
    new_world: int
    new_shared: int
    new_moe: int
    to_new: np.ndarray
    to_old: np.ndarray

    @classmethod
    def parse(cls, info, world: int) -> "Remap":
        v = np.asarray(info.detach().cpu().numpy() if hasattr(info, "numpy") else info, dtype=np.int64)
        return cls(active=bool(v[0]), new_world=int(v[1]), new_shared=int(v[2]), new_moe=int(v[3]),
                   to_new=v[4:4 + world].copy(), to_old=v[4 + world:4 + 2 * world].copy())

    def survivors(self) -> np.ndarray:
        """Original EP ranks of the new ids 0 .. W'-1."""
        return self.to_old[:self.new_world]

    def routing(self, geom: Geometry) -> Geometry:
        """The geometry all routing uses: W', S', E' in the new id space (G keeps its meaning)."""
        if not self.active:
            return geom
        return replace(geom, W=self.new_world, S=self.new_shared, E=self.new_moe)


def identity_remap(world: int) -> Remap:
    ids = np.arange(world, dtype=np.int64)
    return Remap(active=False, new_world=world, new_shared=0, new_moe=0, to_new=ids, to_old=ids)
