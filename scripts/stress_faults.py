"""Stress the failure paths: every fault of scripts/fault_job.py, many times, on 4 and 8 ranks.

    python scripts/stress_faults.py [--runs 20] [--ranks 4,8] [--timeout 5] [--faults ...]

Each run starts a fresh job (one process a rank, with torchrun's environment and an agent
store, through ``emu.testing.jobs.run_job``: torchrun itself would end every rank as soon as
the failing one exits, before the others can report) in which one random rank fails (exits
before dispatch, dies in dispatch's or combine's EP rows exchange, or sleeps forever), and
checks:

* every live rank raised;
* every live rank names the failing rank first (the first sentence), blames it alone
  (culprits), and lists no other rank as dead;
* every live process has exited on its own within EMU_TIMEOUT_S + 5 s of the failing call
  (the sleeping rank is killed once the others are gone).

Prints one line per (fault, ranks) with the counts, and a last line ``stress: N/M runs passed``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from emu.testing.jobs import run_job  # noqa: E402

FAULTS = ("exit-before", "dispatch-rows", "combine-rows", "hang")
WORDS = {"exit-before": "dead", "dispatch-rows": "dead", "combine-rows": "dead", "hang": "stuck"}


def one_run(fault: str, ranks: int, bad: int, timeout_s: float) -> dict:
    """One job (every rank a process of its own, no launcher that ends the job early);
    returns what was checked."""
    job = run_job([os.path.join(HERE, "fault_job.py"), "--fault", fault, "--rank", str(bad)], ranks,
                  env={"EMU_TIMEOUT_S": f"{timeout_s:g}", "OMP_NUM_THREADS": "1"}, timeout_s=timeout_s + 120,
                  stuck={bad} if fault == "hang" else set())
    recs = [json.loads(line[6:]) for p in job for line in p.stdout.splitlines() if line.startswith("FAULT ")]
    live = sorted(set(range(ranks)) - {bad})
    word = WORDS[fault]
    named_first = [r for r in recs if f"rank {bad} is {word}" in r["first_line"].split(": ")[-1]]
    only = [r for r in recs if r["culprits"] == [bad]
            and [p for p, s in r["states"].items() if s == "DEAD"] == ([str(bad)] if word == "dead" else [])]
    start = min((r["t"] - r["seconds"] for r in recs), default=time.time())
    exit_s = max(job[r].exited_at for r in live) - start
    return dict(all_raised=sorted(r["rank"] for r in recs) == live, named_first=len(named_first) == len(live),
                only_culprit=len(only) == len(live), exit_s=exit_s, exited=exit_s <= timeout_s + 5
                and not any(job[r].killed for r in live), error_s=max((r["seconds"] for r in recs), default=float("nan")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--ranks", default="4,8")
    p.add_argument("--timeout", type=float, default=5.0, help="EMU_TIMEOUT_S of the jobs")
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    total = passed = 0
    print(f"{'fault':>14} {'ranks':>5} {'runs':>4} {'all raised':>10} {'culprit first':>13} {'only culprit':>12} "
          f"{'exited':>6} {'error s (median)':>16} {'exit s (max)':>12}")
    for fault in a.faults.split(","):
        for ranks in [int(r) for r in a.ranks.split(",")]:
            runs = [one_run(fault, ranks, rng.randrange(ranks), a.timeout) for _ in range(a.runs)]
            ok = [all(r[k] for k in ("all_raised", "named_first", "only_culprit", "exited")) for r in runs]
            total, passed = total + len(runs), passed + sum(ok)
            print(f"{fault:>14} {ranks:>5} {len(runs):>4} {sum(r['all_raised'] for r in runs):>10} "
                  f"{sum(r['named_first'] for r in runs):>13} {sum(r['only_culprit'] for r in runs):>12} "
                  f"{sum(r['exited'] for r in runs):>6} {statistics.median(r['error_s'] for r in runs):>16.2f} "
                  f"{max(r['exit_s'] for r in runs):>12.2f}", flush=True)
    print(f"stress: {passed}/{total} runs passed")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
