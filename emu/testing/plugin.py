"""mc2-emu's pytest plugin (entry point ``pytest11``): multi-rank tests in three styles.

Fixture style: the test runs in the test process and sends functions to the ranks::

    @pytest.mark.emu_world(4)                       # size, soc="A3", tp=1, timeout=120, env={...}
    def test_layer(emu_world):
        outcomes = emu_world.run(my_layer, emu.testing.per_rank(xs))
        assert outcomes[0].get() ...

Decorator style: the test's body runs on every rank (its arguments come from pytest)::

    @emu.testing.world(4)
    def test_layer():
        ctx = emu.testing.this_rank()
        ...

Class style: every ``test*`` method runs on every rank, once per world size::

    class TestLayer(emu.testing.DistributedTest):
        world_size = [2, 4]
        def test_layer(self): ...

Worlds are started once per test module and reused by its tests; a world whose command hung,
whose ranks died, or whose test failed is replaced before the next test uses it.  Functions
given to the ranks must be importable (module level); their arguments and results picklable.
"""
from __future__ import annotations

import functools
import inspect

import pytest

from .harness import Outcome, Target, World, WorldPool, WorldSpec

_USED = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emu_world(size, soc='A3', tp=1, timeout=120, emu_timeout=None, env=None, "
                                       "fresh=False): the world the emu_world fixture gives this test")


@pytest.fixture(scope="module")
def emu_pool():
    """The worlds of one test module (closed at its end)."""
    pool = WorldPool()
    yield pool
    pool.close()


def _world_for(request: pytest.FixtureRequest, spec: WorldSpec) -> World:
    pool = request.getfixturevalue("emu_pool")
    request.node.stash.setdefault(_USED, []).append((pool, spec))
    return pool.get(spec)


@pytest.fixture
def emu_world(request: pytest.FixtureRequest) -> World:
    """A started :class:`~emu.testing.World` of the size the ``emu_world`` marker asks (default 4);
    ``fresh=True`` in the marker: a world of its own, not reused by later tests (for a test
    that leaves the ranks out of step on purpose)."""
    marker = request.node.get_closest_marker("emu_world")
    options = dict(marker.kwargs) if marker else {}
    fresh = options.pop("fresh", False)
    spec = WorldSpec.of(*(marker.args if marker else (4,)), **options)
    pool = request.getfixturevalue("emu_pool")
    if fresh:
        pool.taint(spec)
        request.addfinalizer(lambda: pool.taint(spec))
    return _world_for(request, spec)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = (yield).get_result()
    if report.when == "call" and report.failed:              # a failing test's world is not reused
        for pool, spec in item.stash.get(_USED, []):
            pool.taint(spec)


def check(outcomes: list[Outcome]) -> list:
    """Every rank's value, or one AssertionError naming every rank that did not return one
    (with its remote traceback)."""
    bad = [o for o in outcomes if not o.ok]
    if bad:
        parts = []
        for o in bad:
            if o.error is not None:
                parts.append(f"rank {o.rank} raised {o.error.type_name}: {o.error.message}\n"
                             f"--- remote traceback (rank {o.rank}) ---\n{o.error.traceback}")
            else:
                parts.append(f"rank {o.rank}: its process exited with code {o.exit_code}")
        raise AssertionError(f"{len(bad)} of {len(outcomes)} ranks failed:\n" + "\n".join(parts))
    return [o.value for o in outcomes]


def _on_ranks(body, target: Target, spec_of, extra: list[inspect.Parameter]):
    """A pytest test that runs ``target`` (the body) on the ranks of ``spec_of(kwargs)``."""
    params = [p for p in inspect.signature(body).parameters.values() if p.name != "self"]

    @functools.wraps(body)
    def test(*args, request, **kwargs):
        spec = spec_of(kwargs)
        check(_world_for(request, spec).run(target, **kwargs))

    test.__emu_body__ = body
    lead = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] if target.method else []
    request = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY)
    test.__signature__ = inspect.Signature(lead + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                   for p in extra + params] + [request])
    return test


def world(size: int, soc: str = "A3", tp: int = 1, timeout: float = 120.0, emu_timeout: float | None = None,
          env: dict | None = None):
    """Decorate a test whose body runs on every rank of a world of ``size`` ranks; the test
    fails if any rank raises (every failing rank's remote traceback is shown)."""
    spec = WorldSpec.of(size, soc, tp, timeout, emu_timeout, env)

    def decorate(fn):
        return _on_ranks(fn, Target(fn.__module__, fn.__qualname__), lambda kwargs: spec, [])
    return decorate


class DistributedTest:
    """Base of a test class whose ``test*`` methods run on every rank, once per world size.

    Class attributes: ``world_size`` (an int or a list), ``soc``, ``tp``, ``timeout``,
    ``emu_timeout``, ``env``.  The class is instantiated without arguments on each rank.
    """

    world_size: int | list[int] = 2
    soc: str = "A3"
    tp: int = 1
    timeout: float = 120.0
    emu_timeout: float | None = None
    env: dict | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        sizes = list(cls.world_size) if isinstance(cls.world_size, (list, tuple)) else [cls.world_size]
        size_param = inspect.Parameter("emu_world_size", inspect.Parameter.KEYWORD_ONLY)
        for name, fn in list(vars(cls).items()):
            if name.startswith("test") and inspect.isfunction(fn) and not hasattr(fn, "__emu_body__"):
                test = _on_ranks(fn, Target(cls.__module__, f"{cls.__qualname__}.{name}", method=True),
                                 functools.partial(_class_spec, cls), [size_param])
                setattr(cls, name, pytest.mark.parametrize("emu_world_size", sizes,
                                                           ids=[f"{n}ranks" for n in sizes])(test))


def _class_spec(cls: type, kwargs: dict) -> WorldSpec:
    """The world of one parametrised call of a DistributedTest method (its size is popped)."""
    return WorldSpec.of(kwargs.pop("emu_world_size"), cls.soc, cls.tp, cls.timeout, cls.emu_timeout, cls.env)
