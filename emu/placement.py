"""Expert -> rank placement (spec §1).

EP ranks ``0 .. S-1`` host shared experts (shared expert ``j`` on ranks ``[j*R, (j+1)*R)``),
ranks ``S .. W-1`` host MoE experts (expert ``e`` on rank ``S + e // L`` as local expert
``e % L``).  A source rank ``r`` sends each active token to one replica of every shared
expert: rank ``r % R + j*R``.  All functions are vectorised over numpy int64 arrays.
"""
from __future__ import annotations

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
