"""The drop-in torch_npu: an unmodified torch_npu client on 4 processes and the example-style script
on 16 (operators: test_npu_ops.py, test_npu_compute.py, test_npu_routing.py; device, streams and
groups: test_npu_tensors.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from emu.core.plan import expand_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(240)


def test_expand_idx_occurrences():
    ids = torch.tensor([[0, 3], [3, 1], [0, 3]], dtype=torch.int32)
    assert expand_idx(ids, None, 4).tolist() == [0, 0, 1, 0, 1, 2]
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    assert expand_idx(ids, mask, 4).tolist() == [0, 0, 0, 0, 0, 1]


def test_unmodified_client_on_4_ranks():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "emu.npu.run",
                          os.path.join(ROOT, "tests", "npu_client.py")], capture_output=True, text=True,
                         timeout=220, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("CLIENT OK") == 4, out.stdout
    assert out.stdout.count("v1: max rel err") == 16 and out.stdout.count("v2: max rel err") == 16


@pytest.mark.parametrize("soc", ["A3", "A2"])
def test_example_style_script_on_16_ranks(soc):
    """tests/npu_example_style.py as Ascend's operator examples are written (torch.multiprocessing,
    "hccl" groups, .npu() inputs, goldens from the routing operators), unchanged, per chip."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, EMU_SOC=soc,
               MASTER_PORT="29643" if soc == "A3" else "29644")
    out = subprocess.run([sys.executable, "-m", "emu.npu.run", os.path.join(ROOT, "tests", "npu_example_style.py")],
                         capture_output=True, text=True, timeout=220, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for case in (("tp2", "shared") if soc == "A3" else ("fullmesh", "hierarchy")):
        assert f"{soc} {case}: 16 ranks" in out.stdout, out.stdout + out.stderr[-2000:]
