"""Parent-side helpers: run a scenario in a world and compare every rank with the reference."""
from __future__ import annotations

import mp_cases
from emu.core.errors import ErrorKind
from emu.testing import Outcome, World
from emu.testing.scenario import RankResult, Scenario, compare, run_reference


def check_scenario(world: World, target=mp_cases.scenario, run_kwargs: dict | None = None,
                   **fields) -> list[RankResult]:
    """Run ``Scenario(**fields)`` on every rank (through ``target``); assert each rank that runs
    the op is bit-exact with the reference (removed ranks answer "idle" or "dead")."""
    sc = Scenario(**fields)
    assert sc.world_size == world.n, f"scenario needs {sc.world_size} ranks, world has {world.n}"
    got = world.run(target, **(run_kwargs or {}), **fields)
    want = run_reference(sc)
    alive = set(sc.survivors())
    for g, res in enumerate(got):
        if g not in alive:
            assert res.value in ("idle", "dead") or res.exit_code == 0, f"removed rank {g} answered {res}"
            continue
        dispatch, x_out, _wait = res.get()
        diff = compare(RankResult(dispatch=dispatch, x_out=x_out), want[g])
        assert not diff, f"rank {g} differs from the reference in {diff} for {sc}"
    return want


def assert_all_raise(results: list[Outcome], code: int, text: str, bad_ranks: list[int] | None = None,
                     kind: ErrorKind = ErrorKind.BAD_INPUT, culprits: tuple[int, ...] | None = None) -> None:
    """Every rank raised AclnnError(code).  The bad ranks (all, when None) raised ``kind``
    (blaming ``culprits`` when given, themselves for BAD_INPUT) naming ``text`` in their message;
    the others raised a PeerError of kind PEER_BAD_INPUT blaming exactly the bad ranks."""
    for res in results:
        g, e = res.rank, res.error
        assert e is not None, f"rank {g} returned {res.value!r} instead of raising"
        assert e.is_a("AclnnError"), f"rank {g} raised {e.type_name}: {e.message}"
        assert e.code == code, f"rank {g} raised code {e.code}, want {code}: {e.message}"
        if bad_ranks is None or g in bad_ranks:
            assert e.kind == kind, f"rank {g} raised {e.kind}, want {kind}: {e.message}"
            assert culprits is None or e.culprits == culprits, (g, e.culprits, culprits)
            assert kind != ErrorKind.BAD_INPUT or e.culprits == (g,), (g, e.culprits)   # it blames its own input
            assert text in e.message.splitlines()[0], f"rank {g}: {text!r} not in {e.message.splitlines()[0]!r}"
        else:
            assert e.type_name == "PeerError", f"rank {g} raised {e.type_name}: {e.message}"
            assert e.kind == ErrorKind.PEER_BAD_INPUT and e.culprits == tuple(bad_ranks), (g, e.kind, e.culprits)
            assert any(f"rank {b} " in e.message or f"rank {b}:" in e.message for b in bad_ranks), e.message
