"""Parent-side helpers: run a scenario in a world and compare every rank with the reference."""
from __future__ import annotations

from emu.scenario import RankResult, Scenario, compare, run_reference
from world import Raised, World


def check_scenario(world: World, target: str = "mp_cases:scenario", run_kwargs: dict | None = None,
                   **fields) -> list[RankResult]:
    """Run ``Scenario(**fields)`` on every rank (through ``target``); assert each rank that runs
    the op is bit-exact with the reference (removed ranks answer "idle" or "dead")."""
    sc = Scenario(**fields)
    assert sc.world_size == world.n, f"scenario needs {sc.world_size} ranks, world has {world.n}"
    got = world.run(target, **(run_kwargs or {}), **fields)
    want = run_reference(sc)
    alive = set(sc.survivors())
    for g, res in enumerate(got):
        assert not isinstance(res, Raised), f"rank {g} raised: {res.message}"
        if g not in alive:
            assert res in ("idle", "dead"), f"removed rank {g} answered {res!r}"
            continue
        dispatch, x_out, _wait = res
        diff = compare(RankResult(dispatch=dispatch, x_out=x_out), want[g])
        assert not diff, f"rank {g} differs from the reference in {diff} for {sc}"
    return want


def assert_all_raise(results: list, code: int, text: str, bad_ranks: list[int] | None = None) -> None:
    """Every rank raised AclnnError(code); the bad ranks name ``text`` in their message."""
    for g, res in enumerate(results):
        assert isinstance(res, Raised), f"rank {g} returned {res!r} instead of raising"
        assert res.is_a("AclnnError"), f"rank {g} raised {res.kind}: {res.message}"
        assert res.code == code, f"rank {g} raised code {res.code}, want {code}: {res.message}"
        if bad_ranks is None or g in bad_ranks:
            assert text in res.message.splitlines()[0], f"rank {g}: {text!r} not in {res.message.splitlines()[0]!r}"
        else:
            assert res.kind == "PeerError", f"rank {g} raised {res.kind}: {res.message}"
            assert any(f"rank {b} " in res.message for b in bad_ranks), res.message
