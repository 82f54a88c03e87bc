import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

os.environ.setdefault("EMU_TIMEOUT_S", "30")


@pytest.fixture
def world(emu_world):
    """The module's world (its size from the module's ``emu_world`` marker)."""
    return emu_world
