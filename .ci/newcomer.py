"""A newcomer's first hour, scripted (run by .ci/run after the tests).

From a fresh clone of this checkout: the README's main-job command verbatim (a fresh venv,
the install, the job), then with that venv every other command the README shows, the
launcher's --help, its documented variants on 2, 4, 8 and 16 ranks, and each invalid flag
(one clear error, exit 2, before any rank starts).  Every command in the ```bash blocks of the
README and of docs/*.md must be run here (or be the test command .ci/run itself runs): a
documented command that breaks, or one nobody runs, fails CI.  Prints one line per step with
its time.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[test]' && pytest -n auto"
NOT_IN_CI = ("scripts/vllm_ascend_demo/",)          # downloads vllm and vllm-ascend: a demo, said so in the README


def documented_commands() -> list[str]:
    """The commands of the README's ```bash blocks, then those of docs/*.md, each once."""
    pages = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                   if f.endswith(".md"))
    out: list[str] = []
    for page in pages:
        text = open(os.path.join(ROOT, page)).read()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#") and line not in out:
                    out.append(line)
    return out


def run(cmd: str, cwd: str, expect: int = 0, must: tuple[str, ...] = (), limit_s: float = 300,
        env: dict | None = None) -> str:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=limit_s,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    dt = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    ok = proc.returncode == expect and all(m in text for m in must)
    print(f"{'ok ' if ok else 'BAD'} {dt:6.1f} s  {cmd}", flush=True)
    if not ok:
        print(text[-4000:])
        raise SystemExit(f"newcomer: {cmd!r} exited {proc.returncode} (want {expect}) or missed {must}")
    return text


def main() -> int:
    commands = documented_commands()
    main_job, test_cmd = commands[0], commands[1]
    assert test_cmd == TEST_COMMAND, f"README's test command changed: {test_cmd!r} (.ci/run runs {TEST_COMMAND!r})"
    covered = {main_job, test_cmd}
    with tempfile.TemporaryDirectory(prefix="newcomer-") as tmp:
        clone = os.path.join(tmp, "mc2-emu")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        run(main_job, clone, must=("warm-up (every rank, no elastic_info): PASS: 8/8",
                                   "elastic (ranks 2,3,4,5 removed, idle): PASS: 4/4"), limit_s=900)
        venv = ". .venv/bin/activate && "
        run(venv + "pip install -q -e '.[test]'", clone, limit_s=600)     # what the README's test command installs
        run(venv + "python launch/dispatch.py --help", clone, must=("--removed-ranks", "--soc"),
            limit_s=30)
        for n, flags, want in ((2, "", "PASS: 2/2"), (4, "--removed dead", "elastic (ranks 1 removed, dead): PASS: 3/3"),
                               (8, "--data random --tp 2 --h 1024", "PASS: 8/8"),
                               (16, "--h 1024 --quant 2 --smooth --mask 2d", "elastic (ranks 4,5,6,7,8,9,10,11 removed")):
            run(venv + f"python launch/dispatch.py --nproc-per-node {n} {flags}".strip(), clone, must=(want,))
        for flags, words in (("--removed-ranks 0,1,2,3,4,5,6,7", "not MoE ranks"), ("--removed-ranks 9", "not MoE ranks"),
                             ("--removed-ranks 1,2,3,4,5,6,7", "MoE experts would survive"),
                             ("--mask foo", "invalid choice"), ("--data foo", "invalid choice"),
                             ("--dtype fp32", "invalid choice"), ("--soc a5", "invalid choice"),
                             ("--soc a2", "needs a multiple of 8 ranks"), ("--tp 2 --nproc-per-node 3", "even world"),
                             ("--h 512", "H=512 violates")):
            run(venv + f"python launch/dispatch.py {flags}", clone, expect=2, must=(words,), limit_s=20)
        for cmd in commands[2:]:
            if any(p in cmd for p in NOT_IN_CI) or cmd.endswith("&"):
                continue
            if "--nnodes 2" in cmd:                       # the two-node run: both halves at once
                half = cmd
                run(venv + f"({half}) & ({half}); wait", clone, must=("PASS: 16/16",), limit_s=600)
                covered |= {cmd, cmd + " &"}
                continue
            musts = {"examples/quickstart.py": (0, ("x_out equals a dense MoE",)),
                     "npu_example_style.py": (0, ("A2 fullmesh: 16 ranks", "A2 hierarchy: 16 ranks")),
                     "emu.npu.run": (0, ("CLIENT OK",)),
                     "find_a_hang.py": (1, ("ranks 0-2 called dispatch at find_a_hang.py",
                                            "rank 3 called all_reduce([1] float32) at find_a_hang.py")),
                     "pytest examples/": (0, (" passed",)),
                     "torchfrtrace": (0, ()), "trace_report.py": (0, ("collectives from 8 ranks",)),
                     "emu.debug.report": (0, ("every group's ranks agree",))}
            expect, must = next((m for key, m in musts.items() if key in cmd), (0, ("PASS",)))
            run(venv + cmd, clone, expect=expect, must=must, limit_s=600)
            covered.add(cmd)
        missed = [c for c in commands if c not in covered and not any(p in c for p in NOT_IN_CI)
                  and c.rstrip(" &") not in covered]
        assert not missed, f"documented commands nobody runs: {missed}"
    print("newcomer: every documented command ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
