"""The drop-in's operators as dispatcher ops (emu/npu/registry.py): one registry whose schemas are
torch_npu 2.14.0's as released (checked against the wheel's yaml), each op a real ``npu::`` op
with its CPU kernel and its fake kernel, and the torch_npu module naming the same op objects.
Graph capture and the MC2 ops inside a world: tests/test_npu_moe_layer.py; npu tensors:
tests/npu_tensor_checks.py."""
from __future__ import annotations

import ast
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import npu_wheel
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from emu.core.errors import PARAM_INVALID, AclnnError
from emu.npu import dtypes, registry, upstream
from emu.npu import ops as torch_npu_face
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


# ============================================================================ torch_npu's dtype names

def test_torch_npu_dtype_names_are_int_codes_on_the_module():
    """torch_npu 2.14 copies torch_npu._C._cd.DType's names onto torch_npu (_exports.py,
    _export_dtype_symbols): plain ints, aclDataType + 256, passed where a schema takes ``int?``.
    install() attaches them (checked in a fresh interpreter: install changes this process's torch)."""
    probe = "import emu.npu; t = emu.npu.install(); print(type(t.hifloat8).__name__, t.hifloat8, t.float4_e2m1fn_x2)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=100,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["int", "290", "296"]
    tnpu = types.ModuleType("torch_npu")
    dtypes.attach(tnpu)
    assert dtypes.NPU_DTYPES["hifloat8"] == tnpu.hifloat8 == 290 and type(tnpu.hifloat8) is int
    assert (tnpu.int4, tnpu.float8_e8m0fnu, tnpu.float4_e2m1fn_x2, tnpu.float4_e1m2fn_x2) == (285, 293, 296, 297)
    assert (tnpu.float32, tnpu.float16, tnpu.int8, tnpu.bfloat16, tnpu.float8_e5m2) == (256, 257, 258, 283, 291)
    assert all(getattr(tnpu, name) == code for name, code in dtypes.NPU_DTYPES.items())
    assert dtypes.torch_dtype(tnpu.bfloat16) is dtypes.torch_dtype(15) is torch.bfloat16
    assert dtypes.torch_dtype(tnpu.hifloat8) is None and dtypes.dtype_name(tnpu.hifloat8) == "torch_npu.hifloat8"


@needs_wheel
def test_dtype_codes_agree_with_the_wheels_meta_tables():
    """The meta functions' TORCH_NPU_DTYPE_TO_STRING_MAP (codes of torch_npu's own dtypes) and the fp8
    entries of TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP name the same codes."""
    with zipfile.ZipFile(WHEEL) as z:
        tree = ast.parse(z.read(npu_wheel.META).decode())
    tables = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
    names = {k.value: v.value for k, v in zip(tables["TORCH_NPU_DTYPE_TO_STRING_MAP"].keys,
                                              tables["TORCH_NPU_DTYPE_TO_STRING_MAP"].values)}
    assert names and all(dtypes.NAME_OF_CODE[code] == name for code, name in names.items())
    scalar = {k.value: ast.unparse(v) for k, v in zip(tables["TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP"].keys,
                                                       tables["TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP"].values)}
    assert scalar[291] == "torch.float8_e5m2" and scalar[292] == "torch.float8_e4m3fn"
    assert dtypes.torch_dtype(291) is torch.float8_e5m2 and dtypes.torch_dtype(292) is torch.float8_e4m3fn


def test_ops_honour_or_refuse_torch_npu_dtype_codes():
    """A2 / A3 kernels: init_routing_v2's x_dtype relabels x (bfloat16 as bfloat16: the same call) and
    refuses hifloat8 (161002); dynamic_quant's dst_type torch_npu.int8 is its default int8."""
    x, ids = torch.randn(3, 4).bfloat16(), torch.tensor([[0], [1], [0]], dtype=torch.int32)
    kw = {"expert_num": 2, "expert_tokens_num_type": 1, "expert_tokens_num_flag": True}
    plain = torch.ops.npu.npu_moe_init_routing_v2(x, ids, **kw)
    named = torch.ops.npu.npu_moe_init_routing_v2(x, ids, x_dtype=dtypes.NPU_DTYPES["bfloat16"], **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain, named))
    with pytest.raises(AclnnError, match="torch_npu.hifloat8") as e:
        torch.ops.npu.npu_moe_init_routing_v2(x, ids, x_dtype=dtypes.NPU_DTYPES["hifloat8"], **kw)
    assert e.value.code == PARAM_INVALID
    y, _ = torch.ops.npu.npu_dynamic_quant(x, dst_type=dtypes.NPU_DTYPES["int8"])
    assert torch.equal(y, torch.ops.npu.npu_dynamic_quant(x)[0])


# ============================================================================ Ascend's own tests, the runner's parts

def test_upstream_runner_reads_methods_and_chips(tmp_path):
    """scripts/ascend_op_tests.py: SupportedDevices names the chips (A3 Ascend910_93, A2 Ascend910B),
    a method naming neither is not run; the first line of a failure is the exception's."""
    src = tmp_path / "test_x.py"
    src.write_text("from torch_npu.testing.testcase import TestCase\n"
                   "from torch_npu.testing.common_utils import SupportedDevices\n"
                   "class T(TestCase):\n"
                   "    @SupportedDevices(['Ascend910B', 'Ascend910_93'])\n    def test_both(self): pass\n"
                   "    @SupportedDevices(['Ascend950'])\n    def test_950(self): pass\n"
                   "    def test_any(self): pass\n    def helper(self): pass\n"
                   "    @parametrize('n', [1, 2])\n    def test_p(self, n): pass\n")
    got = {m.method: m.chips for m in upstream.test_methods(str(src))}
    assert got == {"test_both": ("A3", "A2"), "test_950": (), "test_any": ("A3", "A2"), "test_p": ("A3", "A2")}
    selectors = {m.method: m.selector() for m in upstream.test_methods(str(src))}
    assert selectors["test_both"] == ["T.test_both"] and selectors["test_p"] == ["-k", "*.T.test_p_*"]
    out = ("test_both (__main__.T.test_both) ... ERROR\n\n" + "=" * 70 + "\nERROR: test_both (__main__.T)\n"
           + "-" * 70 + "\nTraceback (most recent call last):\n  File \"x\", line 1\nValueError: inner\n\n"
           "During handling...\nemu.core.errors.AclnnError: [561002] outer\n\n" + "-" * 70 + "\nRan 1 test\n\n"
           "FAILED (errors=1)\n")
    assert upstream.failure_reason(out) == "emu.core.errors.AclnnError: [561002] outer"
