"""Smoke test of an installed mc2-emu (the wheel, not this checkout): run by .ci/run once per torch version.

    python .ci/smoke.py      # the python of a venv with the wheel installed: pip install "mc2_emu-*.whl[test]"

Every step runs in a temporary directory outside the checkout, with the venv's own ``mc2-emu``
and python; the checkout is reached only for the files passed by path (tests/npu_example_style.py,
examples/), never to import ``emu``: the package must come from site-packages, installed
non-editable.  Steps: the version, the quickstart main job on 4 ranks, the torch_npu
example-style script (16 ranks it spawns itself), examples/ through the installed pytest plugin,
and one bad input on one rank of 4 (every rank raises the operator's error and exits).  Prints one
line per step (name, seconds, ok / FAIL); the first failure stops with exit 1 and its output's tail.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MC2_EMU = os.path.join(BIN, "mc2-emu")
SITE = os.path.realpath(sysconfig.get_paths()["purelib"])

# One rank of 4 passes fp32 x (dispatch wants bf16 / fp16): that rank raises AclnnError 161002
# (BAD_INPUT), every peer a PeerError with the same code naming it; each prints and exits 1.
BAD_INPUT_JOB = textwrap.dedent('''
    import sys

    import torch
    import torch.distributed as dist

    import emu

    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    E, K, H, BS = 2 * ep, 2, 1024, 8
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BS, H, generator=g).bfloat16()
    if rank == ep - 1:
        x = x.float()                                       # the bad input
    ids = torch.rand(BS, E, generator=g).argsort(dim=1)[:, :K].int()
    try:
        emu.moe_distribute_dispatch_v2(x, ids, emu.group_name(dist.group.WORLD), ep, rank, E)
    except emu.AclnnError as exc:
        print(f"rank {rank}: {type(exc).__name__} code {exc.code} kind {exc.kind.name} "
              f"culprits {list(exc.culprits)} from {emu.__file__}", flush=True)
        sys.exit(1)
    print(f"rank {rank}: no error", flush=True)
''')


class Failed(Exception):
    pass


def installed(path: str) -> bool:
    """``path`` is in this python's site-packages (an editable install leaves the files in the checkout)."""
    return os.path.realpath(path).startswith(SITE + os.sep)


def sh(cmd: list[str], cwd: str, limit_s: float, must: tuple[str, ...] = (), expect: int = 0) -> str:
    """Run ``cmd`` in ``cwd``; its output, or Failed when the exit code or an expected line is wrong."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        raise Failed(f"{' '.join(cmd)}: still running after {limit_s:.0f} s\n{out}") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != expect:
        raise Failed(f"{' '.join(cmd)}: exit {proc.returncode} (want {expect})\n{out}")
    missing = [m for m in must if m not in out]
    if missing:
        raise Failed(f"{' '.join(cmd)}: output lacks {missing}\n{out}")
    return out


def check_install() -> str:
    """emu is the installed wheel (site-packages, not editable), its pytest plugin too."""
    import emu
    import emu.testing.plugin
    dist = importlib.metadata.distribution("mc2-emu")
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        raise Failed(f"mc2-emu is an editable install: {direct}")
    for mod in (emu, emu.testing.plugin):
        if not installed(mod.__file__):
            raise Failed(f"{mod.__name__} comes from {mod.__file__}, not from {SITE}")
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "mc2_emu"]
    if plugins != ["emu.testing.plugin"]:
        raise Failed(f"pytest11 entry point mc2_emu: {plugins}")
    if not os.access(MC2_EMU, os.X_OK):
        raise Failed(f"no console script {MC2_EMU}")
    import torch
    return f"mc2-emu {dist.version} from {os.path.dirname(emu.__file__)}, torch {torch.__version__}"


def version(tmp: str) -> str:
    want = importlib.metadata.version("mc2-emu")
    out = sh([MC2_EMU, "--version"], tmp, 60)
    if out.strip() != f"mc2-emu {want}":
        raise Failed(f"mc2-emu --version printed {out.strip()!r}, the wheel is {want}")
    return out


def quickstart(tmp: str) -> str:
    return sh([MC2_EMU, "dispatch", "--nproc-per-node", "4"], tmp, 120,
              must=("warm-up (every rank, no elastic_info): PASS: 4/4 ranks match the reference",
                    "elastic (ranks 1 removed, idle): PASS: 3/3 ranks match the reference"))


def npu_example_style(tmp: str) -> str:
    # The script spawns its own 16 ranks (WORLD = 16) with torch.multiprocessing: one process here,
    # on the default chip (A3: tp 2 and a shared expert rank, V1 and V2).
    return sh([MC2_EMU, "run", os.path.join(ROOT, "tests", "npu_example_style.py")], tmp, 150,
              must=("A3 tp2: 16 ranks, 32 dispatch + combine checked",
                    "A3 shared: 16 ranks, 32 dispatch + combine checked", "OK"))


def examples(tmp: str) -> str:
    # -c /dev/null: no ini file (the checkout's pyproject stays out), rootdir and cache in tmp,
    # no conftest above examples/; --trace-config names the file each plugin came from.
    out = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", tmp,
              "--confcutdir", os.path.join(ROOT, "examples"), "--trace-config", os.path.join(ROOT, "examples")],
             tmp, 150, must=(" passed",))
    plugin = [line for line in out.splitlines() if "PLUGIN registered: <module 'emu.testing.plugin'" in line]
    if len(plugin) != 1 or not installed(plugin[0].split(" from '")[-1].rstrip("'>")):
        raise Failed(f"the pytest plugin is not the installed one: {plugin}\n{out}")
    conftests = [line for line in out.splitlines() if line.startswith("PLUGIN registered: <module 'conftest'")]
    if conftests:
        raise Failed(f"a conftest took part: {conftests}\n{out}")
    if " failed" in out or " error" in out:
        raise Failed(out)
    return out


def bad_input(tmp: str) -> str:
    from emu.testing.jobs import run_job
    script = os.path.join(tmp, "bad_input_job.py")
    with open(script, "w") as f:
        f.write(BAD_INPUT_JOB)
    old = os.getcwd()
    os.chdir(tmp)
    try:
        ranks = run_job([script], nproc=4, env={"OMP_NUM_THREADS": "1"}, timeout_s=60)
    finally:
        os.chdir(old)
    text = "\n".join(f"--- rank {p.rank}: exit {p.returncode}{' (killed)' if p.killed else ''}\n{p.stdout}{p.stderr}"
                     for p in ranks)
    for p in ranks:
        kind = "AclnnError code 161002 kind BAD_INPUT" if p.rank == 3 else "PeerError code 161002 kind PEER_BAD_INPUT"
        if p.killed or p.returncode != 1 or f"rank {p.rank}: {kind} culprits [3]" not in p.stdout:
            raise Failed(f"rank {p.rank} did not raise {kind} naming rank 3 and exit 1\n{text}")
        if not installed(p.stdout.rsplit(" from ", 1)[-1].strip()):
            raise Failed(f"rank {p.rank} imported emu from outside {SITE}\n{text}")
    return text


STEPS = (("install", None), ("version", version), ("quickstart 4 ranks", quickstart),
         ("npu_example_style 16 ranks", npu_example_style), ("examples (pytest plugin)", examples),
         ("bad input, 1 rank of 4", bad_input))


def main() -> int:
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mc2-emu-smoke-") as tmp:
        for name, step in STEPS:
            t0 = time.monotonic()
            try:
                out = check_install() if step is None else step(tmp)
            except Failed as exc:
                print(f"{name:<28} {time.monotonic() - t0:6.1f} s  FAIL", flush=True)
                print("\n".join(str(exc).splitlines()[-60:]), flush=True)
                return 1
            note = f"  {out}" if step is None else ""
            print(f"{name:<28} {time.monotonic() - t0:6.1f} s  ok{note}", flush=True)
    print(f"smoke: every step passed in {time.monotonic() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
