"""Elastic scaling with removed ranks whose processes have exited (code 0): the survivors
complete, bit-exact, with nothing from the dead (8 real processes, a world of its own)."""
from __future__ import annotations

import pytest

import mp_cases
from emu.testing import World, WorldSpec
from mp_check import check_scenario

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def world():
    """A world of its own, kept with its dead ranks: the survivors go on calling."""
    with World(WorldSpec.of(8)) as w:
        yield w

DOC = dict(moe=7, k=3, zero=1, copy=1, const=1, data="doc", experts="identity", removed="2,3,4,5")


def test_doc_example_with_dead_removed_ranks(world):
    """Warm-up on all 8, then ranks 2-5 exit while 0, 1, 6, 7 dispatch and combine."""
    check_scenario(world, target=mp_cases.elastic, run_kwargs={"removed_mode": "dead"}, **DOC)
    assert world.dead == {2, 3, 4, 5}
    for p in (world.procs[r] for r in world.dead):
        p.join(timeout=20)
        assert p.exitcode == 0


@pytest.mark.parametrize("fields", [
    dict(moe=14, k=4, removed="2,3,4,5", h=1024, seed=40),
    dict(moe=7, k=3, zero=1, copy=1, const=1, special_frac=0.4, mask="2d", calls=3, removed="2,3,4,5",
         h=1024, seed=41),
    dict(moe=7, k=2, quant=2, smooth=True, comm_quant=2, uneven=True, removed="2,3,4,5", h=1024, seed=42),
], ids=["L2", "special-mask2d-3-calls", "quant-uneven"])
def test_more_elastic_calls_after_the_deaths(world, fields):
    check_scenario(world, target=mp_cases.elastic, run_kwargs={"warmup": False}, **fields)
