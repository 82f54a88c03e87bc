"""Parent-side helpers: run a scenario in a world and compare every rank with the reference."""
from __future__ import annotations

from emu.core.errors import ErrorKind
from emu.testing.scenario import RankResult, Scenario, compare, run_reference
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


def assert_all_raise(results: list, code: int, text: str, bad_ranks: list[int] | None = None,
                     kind: ErrorKind = ErrorKind.BAD_INPUT, culprits: tuple[int, ...] | None = None) -> None:
    """Every rank raised AclnnError(code).  The bad ranks (all, when None) raised ``kind``
    (blaming ``culprits`` when given) naming ``text`` in their message; the others raised a
    PeerError of kind PEER_BAD_INPUT blaming exactly the bad ranks."""
    for g, res in enumerate(results):
        assert isinstance(res, Raised), f"rank {g} returned {res!r} instead of raising"
        assert res.is_a("AclnnError"), f"rank {g} raised {res.type_name}: {res.message}"
        assert res.code == code, f"rank {g} raised code {res.code}, want {code}: {res.message}"
        if bad_ranks is None or g in bad_ranks:
            assert res.kind == kind, f"rank {g} raised {res.kind}, want {kind}: {res.message}"
            assert culprits is None or res.culprits == culprits, (g, res.culprits, culprits)
            assert text in res.message.splitlines()[0], f"rank {g}: {text!r} not in {res.message.splitlines()[0]!r}"
        else:
            assert res.type_name == "PeerError", f"rank {g} raised {res.type_name}: {res.message}"
            assert res.kind == ErrorKind.PEER_BAD_INPUT and res.culprits == tuple(bad_ranks), (g, res.kind,
                                                                                               res.culprits)
            assert any(f"rank {b} " in res.message for b in bad_ranks), res.message
