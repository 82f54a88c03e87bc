"""Faults as a user's job meets them, under torchrun with torch's default group timeout
(scripts/fault_job.py): a rank gone before its first call, a rank that never comes.  Every
live rank raises, blames exactly that rank by typed kind and state, and every process has
left within seconds of the errors (4 processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from emu.core.errors import ErrorKind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 6
pytestmark = pytest.mark.timeout(180)


def run_fault(fault: str, *flags: str) -> tuple[list[dict], float]:
    """Run the fault job on 4 ranks; returns every FAULT record and when the job ended (wall)."""
    env = dict(os.environ, EMU_TIMEOUT_S=str(TIMEOUT_S), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                        os.path.join(ROOT, "scripts", "fault_job.py"), "--fault", fault, "--out", out, *flags],
                       capture_output=True, text=True, env=env, timeout=150)
        end = time.time()
        records = []
        for name in sorted(os.listdir(out)):
            with open(os.path.join(out, name)) as f:
                records.append(json.load(f))
    return records, end


@pytest.mark.parametrize("fault,flags,kind,state", [
    ("exit-before", ["--no-warmup"], "DEAD_PEER", "DEAD"),
    ("hang", [], "TIMEOUT", "STUCK"),
], ids=["gone-before-first-call", "never-comes"])
def test_every_live_rank_blames_the_faulty_rank_and_exits(fault, flags, kind, state):
    records, end = run_fault(fault, *flags)
    assert sorted(r["rank"] for r in records) == [0, 1, 2], records
    for r in records:
        assert r["type"] == "CollectiveError" and r["kind"] == kind and r["culprits"] == [3], r
        assert r["states"]["3"] == state and all(s != "DEAD" for p, s in r["states"].items() if p != "3"), r
        assert r["seconds"] < TIMEOUT_S + 3, r
        assert ErrorKind[r["kind"]] in (ErrorKind.DEAD_PEER, ErrorKind.TIMEOUT)
    if fault == "hang":                            # where it is stuck, from its own Python stack
        assert all("rank 3: stuck in main at fault_job.py:" in r["message"] for r in records), records[0]
        assert all(r["seconds"] >= TIMEOUT_S for r in records)
    # every process left (torchrun ends the hanging one once a rank exits with an error)
    assert end - max(r["t"] for r in records) < 5, end - max(r["t"] for r in records)
