"""The drop-in's operators as dispatcher ops (emu/npu/registry.py): one registry whose schemas are
torch_npu 2.14.0's as released (checked against the wheel's yaml), each op a real ``npu::`` op
with its CPU kernel and its fake kernel, and the torch_npu module naming the same op objects.
Graph capture and the MC2 ops inside a world: tests/test_npu_moe_layer.py; npu tensors:
tests/npu_tensor_checks.py."""
from __future__ import annotations

from pathlib import Path

import npu_wheel
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from emu.npu import ops as torch_npu_face
from emu.npu import registry
from emu.npu.schemas import SCHEMAS, op_name

pytestmark = pytest.mark.timeout(120)
WHEEL = npu_wheel.find_wheel()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason=f"torch_npu {npu_wheel.VERSION} wheel not found: "
                                                       f"{npu_wheel.DOWNLOAD} (or set MC2_EMU_TORCH_NPU_WHEEL)")


@needs_wheel
def test_every_schema_is_the_released_wheels():
    lines = npu_wheel.schema_lines(WHEEL)
    assert [lines.get(op_name(s)) for s in SCHEMAS] == list(SCHEMAS)


@needs_wheel
def test_every_overload_of_a_provided_op_is_provided():
    """A packet resolves its overloads by the arguments: all of torch_npu's must be there."""
    bases = {e.base for e in registry.ENTRIES}
    theirs = {name for name in npu_wheel.schema_lines(WHEEL) if name.split(".")[0] in bases}
    assert theirs == {e.name for e in registry.ENTRIES}


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=lambda e: e.name)
def test_each_op_is_a_dispatcher_op_with_kernel_and_fake(entry):
    packet = getattr(torch.ops.npu, entry.base)
    assert torch_npu_face.EXPORTS[entry.base] is packet                   # torch_npu.X is torch.ops.npu.X
    overload = getattr(packet, entry.name.split(".")[1] if "." in entry.name else "default")
    want = torch._C.parse_schema(f"{registry.NAMESPACE}::{entry.schema}")
    assert overload._schema == want, (str(overload._schema), str(want))
    assert torch._C._dispatch_has_kernel_for_dispatch_key(entry.qualified, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(entry.qualified, "Meta")   # the fake, for meta tensors


def test_the_torch_npu_face_exports_only_registered_ops():
    assert set(torch_npu_face.EXPORTS) == {e.base for e in registry.ENTRIES}
    with pytest.raises(NotImplementedError, match="npu_fused_infer_attention_score is not emulated"):
        torch_npu_face.npu_fused_infer_attention_score(torch.ones(1))


def test_format_cast_is_a_copy_in_the_one_layout():
    x = torch.randn(3, 4)
    for y in (torch.ops.npu.npu_format_cast(x, 29), torch.ops.npu.npu_format_cast(x, torch.empty(1))):
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.ops.npu.get_npu_format(x) == 2
    assert torch.library.opcheck(torch.ops.npu.npu_format_cast.default, (x, 29))["test_schema"] == "SUCCESS"


def test_mc2_fakes_need_no_world():
    """Under FakeTensorMode the MC2 ops give shapes with no group, no communication, no checks on data."""
    with FakeTensorMode():
        x = torch.empty(6, 1024, dtype=torch.bfloat16)
        ids = torch.empty(6, 4, dtype=torch.int32)
        outs = torch.ops.npu.npu_moe_distribute_dispatch_v2(x, ids, "no such group", 8, 3, 16, quant_mode=2)
        # A = G * min(L, K) = (6 * 8) * min(16 / 8, 4) = 96 rows; assist max(Bs*K, 128*A)
        assert [tuple(o.shape) for o in outs] == [(96, 1024), (96,), (128 * 96,), (2,), (16,), (0,), (0,)]
        assert [o.dtype for o in outs] == [torch.int8, torch.float32, torch.int32, torch.int64, torch.int32,
                                           torch.int32, torch.float32]
        y = torch.ops.npu.npu_moe_distribute_combine_v2(outs[0].bfloat16(), ids, outs[2], outs[4],
                                                        torch.empty(6, 4), "no such group", 8, 3, 16)
        assert (tuple(y.shape), y.dtype) == ((6, 1024), torch.bfloat16)


def test_the_docs_page_names_every_op():
    text = (Path(__file__).resolve().parent.parent / "docs" / "torch-npu.md").read_text(encoding="utf-8")
    assert [e.base for e in registry.ENTRIES if f"`{e.base}" not in text] == []
