"""npu tensors, RNG, device identity and "hccl" groups of the drop-in torch_npu, checked in a
process of their own (tests/npu_tensor_checks.py), and A2's V1 combine taking a 2-D expand_idx."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from npu_tensor_checks import CHECKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMU_SOC", "LOCAL_WORLD_SIZE", "EMU_NPU_DEVICE_COUNT")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "npu_tensor_checks.py"), "29533"],
                         capture_output=True, text=True, timeout=150, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_npu_client_basics(results, name):
    assert results[name] == "ok", results[name]
