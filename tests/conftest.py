import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

os.environ.setdefault("EMU_TIMEOUT_S", "30")


def world_fixture(n: int):
    """A module-scoped fixture: one n-rank world shared by every test of the module."""
    @pytest.fixture(scope="module")
    def _world():
        from world import World
        w = World(n, timeout_s=float(os.environ["EMU_TIMEOUT_S"]))
        yield w
        w.close()
    return _world
