"""Process groups of a scenario layout, created once per world and reused (worker side).

Every rank runs the same commands in the same order, so ``new_group`` calls line up.
"""
from __future__ import annotations

from emu.testing.scenario import Scenario, rank_groups

_cache: dict[tuple[int, int], tuple] = {}


def groups_for(sc: Scenario) -> tuple:
    """(ep_group, tp_group or None) of the calling rank for ``sc``'s (ep, tp) layout."""
    key = (sc.ep, 2 if sc.tp == 2 else 1)
    if key not in _cache:
        _cache[key] = rank_groups(sc)
    return _cache[key]

