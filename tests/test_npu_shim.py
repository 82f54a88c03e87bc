"""The drop-in torch_npu: helper ops against plain torch, an unmodified torch_npu client on 4
processes and the example-style script on 16 (device, streams and groups: test_npu_tensors.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from emu.core.plan import expand_idx
from emu.npu import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(240)


def test_swiglu():
    x = torch.randn(5, 16).bfloat16()
    a, b = x.float().chunk(2, dim=-1)
    assert torch.equal(ops.npu_swiglu(x), (F.silu(a) * b).bfloat16())


def test_dynamic_quant():
    x = torch.randn(4, 32)
    x[2] = 0
    y, s = ops.npu_dynamic_quant(x)
    scale = x.abs().amax(-1) / 127
    assert torch.allclose(s, scale)
    want = torch.where(scale[:, None] > 0, x / scale[:, None].clamp_min(1e-30), 0).round()
    assert torch.equal(y, want.to(torch.int8)) and y[2].abs().sum() == 0


@pytest.mark.parametrize("group_list_type", [0, 1])
def test_grouped_matmul_counts_and_cumsum(group_list_type):
    x = torch.randn(7, 8).bfloat16()
    w = torch.randn(3, 8, 5).bfloat16()
    counts = torch.tensor([2, 0, 5])
    gl = counts if group_list_type == 1 else counts.cumsum(0)
    out = ops.npu_grouped_matmul(x=[x], weight=[w], group_list=gl, group_list_type=group_list_type,
                                 split_item=2, group_type=0)[0]
    want = torch.cat([(x[:2].float() @ w[0].float()), (x[2:].float() @ w[2].float())]).bfloat16()
    assert torch.equal(out, want)


def test_grouped_matmul_int8():
    x = torch.randint(-5, 5, (4, 8), dtype=torch.int8)
    w = torch.randint(-5, 5, (2, 8, 3), dtype=torch.int8)
    scale = torch.rand(2, 3)
    pts = torch.rand(4)
    out = ops.npu_grouped_matmul(x=[x], weight=[w], scale=[scale], per_token_scale=[pts], group_list=torch.tensor([1, 3]),
                                 group_list_type=1, split_item=2, output_dtype=torch.float32)[0]
    want = torch.cat([(x[:1].int() @ w[0].int()).float() * scale[0], (x[1:].int() @ w[1].int()).float() * scale[1]])
    assert torch.allclose(out, want * pts[:, None])


def test_dequant_swiglu_quant():
    x = torch.randint(-100, 100, (3, 8), dtype=torch.int32)
    ws = torch.rand(1, 8)
    act = torch.rand(3)
    y, s = ops.npu_dequant_swiglu_quant(x, weight_scale=ws, activation_scale=act, group_index=torch.tensor([3]),
                                        activate_left=True, quant_mode=1)
    f = x.float() * ws * act[:, None]
    a, b = f.chunk(2, -1)
    wy, wsc = ops.npu_dynamic_quant(F.silu(a) * b)
    assert torch.equal(y, wy) and torch.equal(s, wsc)


def test_expand_idx_occurrences():
    ids = torch.tensor([[0, 3], [3, 1], [0, 3]], dtype=torch.int32)
    assert expand_idx(ids, None, 4).tolist() == [0, 0, 1, 0, 1, 2]
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    assert expand_idx(ids, mask, 4).tolist() == [0, 0, 0, 0, 0, 1]


def test_not_emulated_names_and_format_cast():
    x = torch.randn(2, 2)
    assert ops.npu_format_cast(x, 29) is x
    stub = ops.__getattr__("npu_fused_infer_attention_score")      # importable, like the real module
    with pytest.raises(NotImplementedError, match="npu_fused_infer_attention_score is not emulated"):
        stub(x)
    with pytest.raises(AttributeError, match="not emulated"):
        ops.__getattr__("some_other_name")


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
