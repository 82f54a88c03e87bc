"""torch_npu 2.14.0 as released, read from its wheel without an NPU: the op schema (the
codegen yaml) and the meta functions (what torch_npu allocates under graph capture).

The wheel is found at ``$MC2_EMU_TORCH_NPU_WHEEL`` (a .whl file or a directory holding it),
else in ``~/.cache/mc2-emu``, where ``.ci/run`` puts it with
``pip download --no-deps torch-npu==2.14.0 -d ~/.cache/mc2-emu``.
"""
from __future__ import annotations

import ast
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

VERSION = "2.14.0"
SCHEMA = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
META = "torch_npu/op_plugin/meta/_meta_registrations.py"
OPS = ("npu_moe_distribute_dispatch", "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine",
       "npu_moe_distribute_combine_v2", "npu_moe_distribute_combine_add_rms_norm")
DOWNLOAD = f"pip download --no-deps torch-npu=={VERSION} -d ~/.cache/mc2-emu"


def find_wheel() -> Path | None:
    where = os.environ.get("MC2_EMU_TORCH_NPU_WHEEL")
    for place in ([Path(where)] if where else []) + [Path.home() / ".cache" / "mc2-emu"]:
        if place.is_file():
            return place
        if place.is_dir():
            found = sorted(place.glob(f"torch_npu-{VERSION}-*.whl"))
            if found:
                return found[0]
    return None


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: object          # a Python value, or REQUIRED
    keyword_only: bool


REQUIRED = object()


def _default(text: str):
    fixed = {"None": None, "[]": [], "True": True, "False": False}
    if text in fixed:
        return fixed[text]
    if text.startswith('"'):
        return text.strip('"')
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return float(text)


def schema(wheel: Path, ops=OPS) -> dict[str, list[Param]]:
    """Each op's parameters from the codegen yaml (the MC2 ops by default): name, type,
    default, keyword-only."""
    text = zipfile.ZipFile(wheel).read(SCHEMA).decode()
    out = {}
    for op in ops:
        m = re.search(rf"func: {op}\((.*)\) ->", text)
        params, kw = [], False
        for part in (p.strip() for p in m.group(1).split(",")):
            if part == "*":
                kw = True
                continue
            decl, _, default = part.partition("=")
            typ, name = decl.rsplit(" ", 1)
            params.append(Param(name, typ, _default(default) if default else REQUIRED, kw))
        out[op] = params
    return out


def schema_lines(wheel: Path) -> dict[str, str]:
    """Every ``func:`` of the codegen yaml by its name with overload ("npu_grouped_matmul.List")."""
    text = zipfile.ZipFile(wheel).read(SCHEMA).decode()
    return {m.group(1): m.group(0) for m in re.finditer(r"(?<=func: )([\w.]+)\(.*", text)}


def meta_functions(wheel: Path, soc_version: int = 250) -> dict:
    """The meta functions of the MC2 ops; ``soc_version`` below 260 (Ascend 950) is A2 / A3."""
    return named_meta_functions(wheel, [f"{op}_meta" for op in OPS], soc_version)


def meta(x: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor without data, as the meta functions take."""
    return torch.empty(x, dtype=dtype, device="meta")


META_TABLES = ("TORCH_DTYPE_MAP", "TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP", "TORCH_NPU_DTYPE_TO_STRING_MAP",
               "_ASCEND950_SOC_VERSION")
META_HELPERS = ("gmm_get_dtype", "is_transpose_weight", "npu_dtype_to_str", "get_dispatch_dynamic_scales_dtype",
                "get_dispatch_dynamic_shape")


def named_meta_functions(wheel: Path, names, soc_version: int = 250) -> dict:
    """The wheel's meta functions of the given names (e.g. "npu_grouped_matmul_meta"), with the
    module-level dtype tables and helpers they call, executed without decorators on stubs of
    torch_npu's own modules (its private dtypes as their torch_npu codes, the SoC as given)."""
    tree = ast.parse(zipfile.ZipFile(wheel).read(META).decode())
    keep = set(names) | set(META_HELPERS)
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in keep:
            node.decorator_list = []
            body.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") in META_TABLES for t in node.targets):
            body.append(node)
    stub = type("torch_npu", (), {"hifloat8": 290, "float8_e8m0fnu": 293, "float4_e2m1fn_x2": 296,
                                  "float4_e1m2fn_x2": 297, "int4": 285})
    scope = {"torch": torch, "math": math, "torch_npu": stub, "ops_error": lambda *a, **k: "",
             "get_soc_version": lambda: soc_version, "print": lambda *a, **k: None,
             "ErrCode": type("ErrCode", (), {"VALUE": 0, "PARAM": 1, "TYPE": 2, "NOT_SUPPORT": 3})}
    exec(compile(ast.Module(body=body, type_ignores=[]), META, "exec"), scope)  # noqa: S102 (the wheel's own code)
    return {name: scope[name] for name in names}
