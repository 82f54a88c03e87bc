"""npu tensors crossing processes (torch.multiprocessing with "spawn": Process arguments, queues, pools)
and their storage (``untyped_storage()``, ``resize_(0)``, ``record_stream``, ``torch.save``), checked in
a process of their own (tests/npu_process_checks.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from npu_process_checks import CHECKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMU_SOC", "LOCAL_WORLD_SIZE", "EMU_NPU_DEVICE_COUNT")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "npu_process_checks.py")],
                         capture_output=True, text=True, timeout=150, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_npu_processes_and_storage(results, name):
    assert results[name] == "ok", results[name]
