"""Stress the failure paths: every fault of scripts/fault_job.py, many times, on 4 and 8 ranks.

    python scripts/stress_faults.py [--runs 20] [--ranks 4,8] [--timeout 5] [--faults ...]

Each run starts a fresh torchrun job in which one random rank fails (exits before dispatch,
dies in dispatch's or combine's EP rows exchange, or sleeps forever) and checks:

* every live rank raised;
* every live rank names the failing rank first (the first sentence), blames it alone
  (culprits), and lists no other rank as dead;
* every process has exited within EMU_TIMEOUT_S + 5 s of the failing call.

Prints one line per (fault, ranks) with the counts, and a last line ``stress: N/M runs passed``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FAULTS = ("exit-before", "dispatch-rows", "combine-rows", "hang")
WORDS = {"exit-before": "dead", "dispatch-rows": "dead", "combine-rows": "dead", "hang": "stuck"}


def one_run(fault: str, ranks: int, bad: int, timeout_s: float) -> dict:
    """One torchrun job; returns what was checked."""
    env = dict(os.environ, EMU_TIMEOUT_S=str(timeout_s), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               os.path.join(HERE, "fault_job.py"), "--fault", fault, "--rank", str(bad), "--out", out]
        subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s + 120)
        end = time.time()
        recs = []
        for name in sorted(os.listdir(out)):
            with open(os.path.join(out, name)) as f:
                recs.append(json.load(f))
    live = sorted(set(range(ranks)) - {bad})
    named_first = [r for r in recs if f"rank {bad} is {WORDS[fault]}" in r["first_line"].split(": ")[-1]]
    only = [r for r in recs if r["culprits"] == [bad]
            and [p for p, s in r["states"].items() if s == "DEAD"] == ([str(bad)] if WORDS[fault] == "dead" else [])]
    start = min((r["t"] - r["seconds"] for r in recs), default=end)
    return dict(all_raised=sorted(r["rank"] for r in recs) == live, named_first=len(named_first) == len(live),
                only_culprit=len(only) == len(live), exit_s=end - start,
                exited=end - start <= timeout_s + 5, error_s=max((r["seconds"] for r in recs), default=float("nan")))


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
