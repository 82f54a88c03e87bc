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


def meta_functions(wheel: Path, soc_version: int = 250) -> dict:
    """The meta functions of the MC2 ops (and the helpers they call), executed on stubs of
    torch_npu's own modules; ``soc_version`` below 260 (Ascend 950) is A2 / A3."""
    source = zipfile.ZipFile(wheel).read(META).decode()
    tree = ast.parse(source)
    keep = {f"{op}_meta" for op in OPS} | {"get_dispatch_dynamic_scales_dtype", "get_dispatch_dynamic_shape"}
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in keep:
            node.decorator_list = []
            body.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in
                                                  ("TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP",
                                                   "_ASCEND950_SOC_VERSION") for t in node.targets):
            body.append(node)
    scope = {"torch": torch, "math": math, "get_soc_version": lambda: soc_version,
             "ops_error": lambda *a, **k: "", "ErrCode": type("ErrCode", (), {"VALUE": 0, "PARAM": 1})}
    exec(compile(ast.Module(body=body, type_ignores=[]), META, "exec"), scope)   # noqa: S102 (the wheel's own code)
    return {name: scope[name] for name in keep if name in scope}


def meta(x: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor without data, as the meta functions take."""
    return torch.empty(x, dtype=dtype, device="meta")
