"""A rank dies in the middle of a call: every live rank raises within EMU_TIMEOUT_S with a
CollectiveError of kind DEAD_PEER blaming exactly the dead rank, and never takes a live or
failed-after rank for dead (4 real processes, a world per case)."""
from __future__ import annotations

import pytest

from emu.core.errors import ErrorKind, RankState
import mp_cases
from emu.testing import World, WorldSpec

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 8.0
FIELDS = dict(ep=4, moe=6, shared_ranks=1, k=2, bs=4, h=1024)


@pytest.mark.parametrize("fault,collective,transport", [
    ("2:dispatch:EP rows", "dispatch #1 EP rows", "auto"),          # a group's first call: header, then rows
    ("1:combine:EP header", "combine #1 EP header", "auto"),        # later calls: the rows ride with the header
    ("3:combine:EP rows", "combine #1 EP rows", "split"),
], ids=["mid-dispatch", "combine-header", "mid-combine"])
def test_dead_rank_named_by_every_live_rank(fault, collective, transport):
    dead = int(fault.split(":")[0])
    with World(WorldSpec.of(4, emu_timeout=TIMEOUT_S, env={"EMU_TRANSPORT": transport})) as world:
        res = world.run(mp_cases.with_fault, fault=fault, deadline_s=60, **FIELDS)
    assert res[dead].exit_code == 1, res[dead]
    for g, r in enumerate(res):
        if g == dead:
            continue
        message, seconds, kind, culprits, states = r.get()
        assert message.startswith("CollectiveError"), (g, message)
        assert kind == ErrorKind.DEAD_PEER and culprits == (dead,), (g, kind, culprits, message)
        assert states[dead] == RankState.DEAD, (g, states)
        assert [p for p, s in states.items() if s == RankState.DEAD] == [dead], (g, states)
        assert collective in message.splitlines()[0], (g, message)
        assert seconds < TIMEOUT_S + 20, (g, seconds)        # far below the group timeout (120 s)
