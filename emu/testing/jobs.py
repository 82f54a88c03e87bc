"""Run a script as a job of n rank processes, the way torchrun does, but let every process
finish on its own: torchrun ends the whole job as soon as one rank exits with an error, so
the others never get to report; a failure test wants to see what each of them did.

    ranks = run_job(["scripts/fault_job.py", "--fault", "hang"], nproc=4, stuck={3})
    ranks[0].returncode, ranks[0].stdout, ranks[0].exited_at

Each process gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE) and the rendezvous store is hosted
here, as torchrun's agent hosts it, so any rank may die without taking the store with it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class RankProcess:
    """How one rank process ended: its exit code (negative: killed by that signal), its
    output, the wall-clock time it exited, and whether this launcher had to kill it."""

    rank: int
    returncode: int
    stdout: str
    stderr: str
    exited_at: float
    killed: bool


def run_job(argv: list[str], nproc: int, env: dict | None = None, timeout_s: float = 300.0,
            stuck: set[int] | frozenset[int] = frozenset()) -> list[RankProcess]:
    """Run ``python argv...`` as ``nproc`` ranks and wait for every one.  Ranks in ``stuck``
    (known never to return) are killed once every other rank has exited; any rank still
    running after ``timeout_s`` is killed."""
    store = dist.TCPStore("127.0.0.1", 0, world_size=nproc + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    base = dict(os.environ, **(env or {}), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), TORCHELASTIC_USE_AGENT_STORE="True")
    with tempfile.TemporaryDirectory(prefix="emu-job-") as tmp:
        outs = [(open(os.path.join(tmp, f"{r}.out"), "w+"), open(os.path.join(tmp, f"{r}.err"), "w+"))
                for r in range(nproc)]
        procs = [subprocess.Popen([sys.executable, *argv], stdout=outs[r][0], stderr=outs[r][1],
                                  env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nproc)]
        ended: dict[int, tuple[int, float, bool]] = {}
        deadline = time.monotonic() + timeout_s
        while len(ended) < nproc:
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = (p.returncode, time.time(), False)
            others_done = all(r in ended for r in range(nproc) if r not in stuck)
            for r, p in enumerate(procs):
                if r not in ended and (others_done and r in stuck or time.monotonic() > deadline):
                    p.kill()
                    ended[r] = (p.wait(), time.time(), True)
            time.sleep(0.02)
        result = []
        for r in range(nproc):
            text = []
            for f in outs[r]:
                f.seek(0)
                text.append(f.read())
                f.close()
            code, at, killed = ended[r]
            result.append(RankProcess(r, code, text[0], text[1], at, killed))
    return result


def under_torchrun(target: list[str], argv: list[str], nproc: int, show_stderr: bool = False) -> int:
    """Run ``target argv...`` (a script path, or ``["-m", module]``) under torchrun with ``nproc``
    ranks: its output streamed as it comes, torchrun's own report of failed ranks (stderr) kept
    back unless ``show_stderr`` or unless no rank said why it failed; returns torchrun's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *target, *argv]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        said_why = False
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            said_why = said_why or line.startswith(("FAIL:", "rank ")) or " FAIL: " in line
        code = proc.wait()
        if code != 0 and (show_stderr or not said_why):
            err.seek(0)
            sys.stderr.write(err.read())
    return code
