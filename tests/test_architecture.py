"""The package layout is the architecture: the import-linter contract in pyproject.toml
(layers, no circles) holds, the core and the references never touch torch.distributed, and
the library has no function-level imports but the optional matplotlib and pytest plugin."""
from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMU = ROOT / "emu"
pytestmark = pytest.mark.timeout(120)


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(module, line, at module level) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), node.lineno, id(node) in top))
    return out


def test_layer_contract_holds():
    exe = shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter) is part of the test dependencies"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=100,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("package", ["core", "reference"])
def test_core_and_references_never_touch_torch_distributed(package):
    bad = [(p.name, line) for p in (EMU / package).rglob("*.py") for mod, line, _ in _imports(p)
           if mod.startswith("torch.distributed")]
    assert bad == []


def test_no_function_level_imports_but_optional_dependencies():
    """matplotlib (pictures) and the pytest plugin are imported where they are used only."""
    inner = [(str(p.relative_to(ROOT)), line, mod) for p in EMU.rglob("*.py") for mod, line, top in _imports(p)
             if not top and not mod.startswith(("matplotlib", "__future__")) and mod != "." + "plugin"]
    assert inner == []


def test_no_long_parameter_lists_outside_the_torch_npu_face():
    """Inputs travel as bundles: only torch_npu-shaped functions (the API, the torch_npu module,
    the reference with torch_npu's keywords) take more than 8 parameters."""
    faces = {EMU / "api.py", EMU / "npu" / "compute.py", EMU / "npu" / "routing.py", EMU / "testing" / "expect.py"}
    long = []
    for p in set(EMU.rglob("*.py")) - faces:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef):
                names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                if len([n for n in names if n not in ("self", "cls")]) > 8:
                    long.append((str(p.relative_to(ROOT)), node.name, len(names)))
    assert long == []
