"""Ascend's own operator tests (Ascend/op-plugin's ``test/test_custom_ops``), run unchanged on
the drop-in ``torch_npu``: what ``scripts/ascend_op_tests.py`` prints.

The test files are taken at one pinned commit, from a local git directory (bare or a checkout)
or a plain directory holding ``test/test_custom_ops``, or else from GitHub's archive of that
commit, and written to a temporary directory (never into this repository).  Each test method
runs alone in a fresh process, ``python -m emu.npu.run FILE -v Class.method``, once per chip
its ``SupportedDevices`` names (``EMU_SOC``: A3 for Ascend910_93, A2 for Ascend910B), with the
environment :data:`FILES` gives its file (the MC2 tests spawn 16 ranks: 16 devices).
"""
from __future__ import annotations

import ast
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

REPOSITORY = "Ascend/op-plugin"
COMMIT = "517f2e7d0f202f38b76310706cb977ca2388ad21"
TEST_DIR = "test/test_custom_ops"
ARCHIVE_URL = "https://codeload.github.com/{repo}/tar.gz/{commit}"

#: SupportedDevices' family name -> the EMU_SOC that answers it.
CHIPS = {"Ascend910_93": "A3", "Ascend910B": "A2"}
_SIXTEEN = {"EMU_NPU_DEVICE_COUNT": "16"}


@dataclass(frozen=True)
class UpstreamFile:
    """One test file of ``test/test_custom_ops``: the environment its processes need, and what
    it tests."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    what: str = ""


#: The upstream test files the drop-in answers (the MC2 ops, the barrier, the routing ops and the
#: compute ops it provides).  Left out: test_moe_distribute_dispatch_combine_urma.py (the
#: URMA setup / teardown operators of another interconnect), test_moe_update_expert.py (not
#: emulated), test_npu_swi_glu_backward.py (npu_swiglu's backward is not emulated).
FILES: tuple[UpstreamFile, ...] = (
    UpstreamFile("test_moe_distribute_dispatch.py", _SIXTEEN, "MC2 dispatch (V1), A3, 16 ranks"),
    UpstreamFile("test_moe_distribute_combine.py", _SIXTEEN, "MC2 combine (V1), A3, 16 ranks"),
    UpstreamFile("test_moe_distribute_dispatch_v2.py", _SIXTEEN, "MC2 dispatch V2, A3, 16 ranks"),
    UpstreamFile("test_moe_distribute_combine_v2.py", _SIXTEEN, "MC2 combine V2, A3, 16 ranks"),
    UpstreamFile("test_moe_distribute_combine_add_rms_norm.py", _SIXTEEN, "MC2 combine + add_rms_norm, A3"),
    UpstreamFile("test_moe_distribute_dispatchA2.py", _SIXTEEN, "MC2 dispatch, A2, 16 ranks"),
    UpstreamFile("test_moe_distribute_combineA2.py", _SIXTEEN, "MC2 combine, A2, 16 ranks"),
    UpstreamFile("test_distribute_barrier.py", _SIXTEEN, "_npu_distribute_barrier"),
    UpstreamFile("test_npu_moe_init_routing.py", {}, "routing: init_routing"),
    UpstreamFile("test_npu_moe_init_routing_v2.py", {}, "routing: init_routing_v2"),
    UpstreamFile("test_npu_moe_gating_top_k_softmax.py", {}, "routing: gating top-k softmax"),
    UpstreamFile("test_npu_moe_finalize_routing_v2.py", {}, "routing: finalize_routing"),
    UpstreamFile("test_npu_moe_compute_tokens.py", {}, "routing: compute_expert_tokens"),
    UpstreamFile("test_npu_moe_re_routing.py", {}, "routing: re_routing"),
    UpstreamFile("test_npu_grouped_matmul.py", {}, "compute: grouped matmul"),
    UpstreamFile("test_npu_dequant_swiglu_quant.py", {}, "compute: dequant_swiglu_quant"),
    UpstreamFile("test_npu_dynamic_quant.py", {}, "compute: dynamic_quant"),
    UpstreamFile("test_npu_moe_token_permute_and_unpermute.py", {}, "compute: token permute / unpermute"),
    UpstreamFile("test_npu_swi_glu.py", {}, "compute: swiglu"),
)


# ----------------------------------------------------------------------------- sources

def _git_dir(source: str) -> bool:
    """Whether ``source`` is a git directory or checkout (read with ``git show``, nothing changed)."""
    probe = subprocess.run(["git", "-C", source, "rev-parse", "--git-dir"], capture_output=True, text=True,
                           check=False)
    return probe.returncode == 0


def _from_git(source: str, commit: str, names: Iterable[str]) -> dict[str, bytes]:
    out = {}
    for name in names:
        shown = subprocess.run(["git", "-C", source, "show", f"{commit}:{TEST_DIR}/{name}"], capture_output=True,
                               check=False)
        if shown.returncode != 0:
            raise FileNotFoundError(f"{source}: no {TEST_DIR}/{name} at {commit[:8]}: "
                                    f"{shown.stderr.decode(errors='replace').strip()}")
        out[name] = shown.stdout
    return out


def _from_directory(source: str, names: Iterable[str]) -> dict[str, bytes]:
    out = {}
    for name in names:
        with open(os.path.join(source, TEST_DIR, name), "rb") as f:
            out[name] = f.read()
    return out


def _from_github(commit: str, names: Iterable[str]) -> dict[str, bytes]:
    """The files from GitHub's tar.gz of the commit (members ``<repo>-<commit>/<TEST_DIR>/<name>``)."""
    url = ARCHIVE_URL.format(repo=REPOSITORY, commit=commit)
    with urllib.request.urlopen(url, timeout=300) as response:
        data = response.read()
    wanted = set(names)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            _, _, rest = member.name.partition("/")
            if member.isfile() and rest.startswith(TEST_DIR + "/") and rest[len(TEST_DIR) + 1:] in wanted:
                out[rest[len(TEST_DIR) + 1:]] = tar.extractfile(member).read()
    missing = wanted - set(out)
    if missing:
        raise FileNotFoundError(f"{url}: no {sorted(missing)} under {TEST_DIR}")
    return out


def fetch_tests(dest: str, source: str | None = None, commit: str = COMMIT,
                names: Iterable[str] | None = None) -> dict[str, str]:
    """Write the test files (``names``, default :data:`FILES`) at ``commit`` into ``dest``;
    returns name -> path.  ``source``: a git directory / checkout, or a directory holding
    ``test/test_custom_ops`` (taken as it is); None: GitHub's archive of the commit."""
    wanted = list(names) if names is not None else [f.name for f in FILES]
    if source is None:
        files = _from_github(commit, wanted)
    elif _git_dir(source):
        files = _from_git(source, commit, wanted)
    else:
        files = _from_directory(source, wanted)
    os.makedirs(dest, exist_ok=True)
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(dest, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


# ----------------------------------------------------------------------------- test methods

@dataclass(frozen=True)
class TestMethod:
    """One ``Class.method`` of a test file and the chips it runs on (its ``SupportedDevices``:
    the chips named; none named but other devices: ``()``, reported as a skip without running;
    no decorator: both chips)."""

    file: str
    cls: str
    method: str
    chips: tuple[str, ...]
    devices: tuple[str, ...] = ()
    parametrized: bool = False

    @property
    def test_id(self) -> str:
        return f"{self.cls}.{self.method}"

    def selector(self) -> list[str]:
        """unittest arguments running this method: its name, or for a method torch's
        ``@parametrize`` expands (test_x_<params>) a pattern of its instances."""
        return ["-k", f"*.{self.test_id}_*"] if self.parametrized else [self.test_id]


def _supported_devices(decorators: list[ast.expr]) -> list[str] | None:
    """The device families a ``@SupportedDevices([...])`` decorator lists (None: no decorator)."""
    for d in decorators:
        named = isinstance(d, ast.Call) and getattr(d.func, "id", getattr(d.func, "attr", "")) == "SupportedDevices"
        if named and d.args and isinstance(d.args[0], (ast.List, ast.Tuple)):
            return [e.value for e in d.args[0].elts if isinstance(e, ast.Constant)]
    return None


def _parametrized(decorators: list[ast.expr]) -> bool:
    """Whether torch's ``@parametrize(...)`` decorates the method."""
    return any(isinstance(d, ast.Call) and getattr(d.func, "id", getattr(d.func, "attr", "")) == "parametrize"
               for d in decorators)


def _is_test_case(node: ast.ClassDef) -> bool:
    return any(getattr(b, "id", getattr(b, "attr", "")).endswith("TestCase") for b in node.bases)


def test_methods(path: str) -> list[TestMethod]:
    """The ``test*`` methods of the TestCase classes of ``path`` (parsed, not imported)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and _is_test_case(node)):
            continue
        class_devices = _supported_devices(node.decorator_list)
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                devices = _supported_devices(item.decorator_list) or class_devices
                chips = tuple(CHIPS) if devices is None else tuple(d for d in CHIPS if d in devices)
                out.append(TestMethod(os.path.basename(path), node.name, item.name,
                                      tuple(CHIPS[d] for d in chips), tuple(devices or ()),
                                      _parametrized(item.decorator_list)))
    return out


# ----------------------------------------------------------------------------- running

@dataclass(frozen=True)
class Result:
    """One (file, method, chip): ``status`` pass / fail / skip, ``reason`` (the first line of
    the failure or the skip reason), wall ``seconds``."""

    method: TestMethod
    chip: str
    status: str
    reason: str = ""
    seconds: float = 0.0


_SKIPPED = re.compile(r"\.\.\. skipped '(.*)'")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Failure|Exit|Interrupt)|AssertionError)\b.*")


def failure_reason(output: str) -> str:
    """The first line of the reason a unittest run failed: the exception line closing the last
    traceback of the first FAIL / ERROR block (else the last exception-like line, else the tail)."""
    lines = output.splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r"^(FAIL|ERROR): ", ln)]
    if starts:
        body = []
        for ln in lines[starts[0] + 2:]:                 # past the block's dashes
            if ln in ("-" * 70, "=" * 70):
                break
            body.append(ln)
        found = [ln.strip() for ln in body if _EXCEPTION.match(ln)]
        if found:
            return found[-1]
    found = [ln.strip() for ln in lines if _EXCEPTION.match(ln)]
    if found:
        return found[-1]
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1] if tail else "no output"


def _classify(returncode: int, output: str) -> tuple[str, str]:
    """pass (OK, at least one test ran and was not skipped), skip (every test skipped: the first
    reason) or fail; a run of no test (a pattern matching nothing) fails."""
    ran = re.search(r"^Ran (\d+) tests?", output, re.MULTILINE)
    ok = re.search(r"^OK(?: \(skipped=(\d+)\))?", output, re.MULTILINE)
    if returncode == 0 and ok and ran and int(ran.group(1)) > 0:
        skipped = _SKIPPED.search(output)
        if ok.group(1) and int(ok.group(1)) == int(ran.group(1)) and skipped:
            return "skip", skipped.group(1)
        return "pass", ""
    if returncode == 0 and ran and int(ran.group(1)) == 0:
        return "fail", "no test ran"
    return "fail", failure_reason(output)


def repository_root() -> str:
    """This repository's root (the parent of the ``emu`` package), put on the children's path."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_method(method: TestMethod, chip: str, directory: str, env: dict[str, str] | None = None,
               timeout: float = 900.0) -> Result:
    """Run one test method unchanged on ``chip`` in a fresh process (cwd ``directory``), in a
    session of its own: on timeout the whole session (the ranks it spawned too) is killed, and
    the reason names the first error its processes printed (a test whose ranks raise waits
    forever for their results)."""
    child = dict(os.environ, EMU_SOC=chip, **(env or {}))
    child["PYTHONPATH"] = os.pathsep.join(p for p in (repository_root(), child.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "emu.npu.run", os.path.join(directory, method.file), "-v", *method.selector()]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=directory, env=child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        seen = [ln.strip() for ln in _text(out).splitlines() if _EXCEPTION.match(ln)]
        why = f"; its processes raised: {seen[0]}" if seen else ""
        return Result(method, chip, "fail", f"timed out after {timeout:.0f} s{why}", time.monotonic() - start)
    status, reason = _classify(proc.returncode, _text(out))
    return Result(method, chip, status, reason, time.monotonic() - start)


def plan(paths: dict[str, str]) -> list[tuple[TestMethod, str | None]]:
    """(method, chip) of every run, in :data:`FILES` order; chip None: the method names no chip
    mc2-emu emulates (a skip, not run)."""
    runs: list[tuple[TestMethod, str | None]] = []
    for f in FILES:
        if f.name not in paths:
            continue
        for m in test_methods(paths[f.name]):
            runs += [(m, chip) for chip in m.chips] or [(m, None)]
    return runs


def run_all(paths: dict[str, str], directory: str, jobs: int = 2, timeout: float = 900.0,
            selected: str | None = None) -> Iterable[Result]:
    """Run every planned (method, chip) (``selected``: a regular expression searched in
    ``file::Class.method``), ``jobs`` at a time (the tests that spawn ranks alone, one after the
    other); yields results as they finish."""
    env_of = {f.name: f.env for f in FILES}
    runs = [(m, c) for m, c in plan(paths) if not selected or re.search(selected, f"{m.file}::{m.test_id}")]
    for m, c in runs:
        if c is None:
            yield Result(m, "-", "skip", f"only on {list(m.devices)}")
    wide = [(m, c) for m, c in runs if c is not None and env_of[m.file]]
    narrow = [(m, c) for m, c in runs if c is not None and not env_of[m.file]]
    for m, c in wide:
        yield run_method(m, c, directory, env_of[m.file], timeout)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_method, m, c, directory, env_of[m.file], timeout) for m, c in narrow]
        for fut in futures:
            yield fut.result()
