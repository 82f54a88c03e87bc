"""Faults as a user's job meets them, with torch's default group timeout (scripts/fault_job.py,
one process a rank as torchrun starts them): a rank gone before its first call, a rank that
never comes.  Every live rank raises, blames exactly that rank by typed kind and state, and
every live process exits on its own within seconds of its error (4 processes)."""
from __future__ import annotations

import json
import os

import pytest

from emu.core.errors import ErrorKind
from emu.testing.jobs import run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 6
SLACK_S = 30        # bounds far below torch's 30-minute group timeout, loose enough for a loaded machine
pytestmark = pytest.mark.timeout(180)


def run_fault(fault: str, *flags: str) -> tuple[list[dict], list]:
    """The fault job on 4 ranks (rank 3 fails); every FAULT record and how each process ended."""
    job = run_job([os.path.join(ROOT, "scripts", "fault_job.py"), "--fault", fault, *flags], 4,
                  env={"EMU_TIMEOUT_S": str(TIMEOUT_S), "OMP_NUM_THREADS": "1"}, timeout_s=150,
                  stuck={3} if fault == "hang" else set())
    return [json.loads(line[6:]) for p in job for line in p.stdout.splitlines() if line.startswith("FAULT ")], job


@pytest.mark.parametrize("fault,flags,kind,state", [
    ("exit-before", ["--no-warmup"], "DEAD_PEER", "DEAD"),
    ("hang", [], "TIMEOUT", "STUCK"),
], ids=["gone-before-first-call", "never-comes"])
def test_every_live_rank_blames_the_faulty_rank_and_exits(fault, flags, kind, state):
    records, job = run_fault(fault, *flags)
    assert sorted(r["rank"] for r in records) == [0, 1, 2], records
    for r in records:
        assert r["type"] == "CollectiveError" and r["kind"] == kind and r["culprits"] == [3], r
        assert r["states"]["3"] == state and all(s != "DEAD" for p, s in r["states"].items() if p != "3"), r
        assert r["seconds"] < TIMEOUT_S + SLACK_S, r
        assert ErrorKind[r["kind"]] in (ErrorKind.DEAD_PEER, ErrorKind.TIMEOUT)
    if fault == "hang":                            # where it is stuck, from its own Python stack
        assert all("rank 3: stuck in main at fault_job.py:" in r["message"] for r in records), records[0]
        assert all(r["seconds"] >= TIMEOUT_S for r in records)
    # every live process left on its own, with the error's exit code, soon after EMU_TIMEOUT_S (its
    # gloo threads never wait for torch's 30-minute group timeout; scripts/stress_faults.py measures)
    for r in records:
        p = job[r["rank"]]
        since_call = p.exited_at - (r["t"] - r["seconds"])
        assert p.returncode == 1 and not p.killed and since_call < TIMEOUT_S + SLACK_S, (p.returncode, since_call)
