"""Which chip's behaviour to emulate: Atlas A3 (default) or Atlas A2 (Ascend910B).

A2 is chosen explicitly, never guessed: ``EMU_SOC=A2`` in the environment (also accepted:
``Ascend910B``), or ``launch/dispatch.py --soc a2``.  On A2 the operators take different paths
(docs/atlas-a2.md): ``comm_alg`` "fullmesh" or "hierarchy", or ""/None to let the HCCL environment
choose (docs/atlas-a2.md).
"""
from __future__ import annotations

import os

from .env import getenv
from .errors import TILING_ERROR, AclnnError


def current_soc() -> str:
    """"A2" or "A3" (default), from EMU_SOC."""
    raw = getenv("EMU_SOC", "A3").strip().upper()
    if raw in ("A2", "ASCEND910B", "910B"):
        return "A2"
    if raw in ("A3", "ASCEND910_93", "910_93", ""):
        return "A3"
    raise AclnnError(TILING_ERROR, f"EMU_SOC={raw!r} is not a chip mc2-emu emulates (A3 or A2)")


def a2_comm_alg(comm_alg: str | None, op: str) -> str:
    """"fullmesh" or "hierarchy" as A2 tiling picks it (docs/atlas-a2.md); 561002 for other values."""
    if comm_alg in (None, "", "0"):
        hier = os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"
        return "hierarchy" if hier else "fullmesh"
    if comm_alg in ("fullmesh", "hierarchy"):
        return comm_alg
    raise AclnnError(TILING_ERROR, f"{op}: comm_alg={comm_alg!r} violates: on Atlas A2 it must be "
                                   f"'', 'fullmesh' or 'hierarchy'")
