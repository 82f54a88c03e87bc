"""What the test harness (emu.testing) costs: starting a world, and each test on a warm one.

    python scripts/bench_harness.py [--runs 50]

Prints, for worlds of 4 and 8 ranks: the first test's cost (spawn the processes, import
torch, join gloo, make the groups) and the per-test overhead on a warm world (one trivial
function on every rank, round trip from the test process, median and 90th percentile), then
``harness_overhead_ms=...`` for the 4-rank world.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import emu.testing as et  # noqa: E402


def noop() -> int:
    return et.this_rank().rank


def measure(size: int, runs: int) -> tuple[float, float, float]:
    """(startup s, median ms, p90 ms) of a ``size``-rank world."""
    t0 = time.perf_counter()
    with et.World(et.WorldSpec.of(size)) as world:
        world.run(noop)
        first = time.perf_counter() - t0
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            assert [o.get() for o in world.run(noop)] == list(range(size))
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return first, statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    print(f"{'ranks':>5} {'first test s':>12} {'per test ms (median)':>20} {'p90 ms':>7}")
    rows = {}
    for size in (4, 8):
        rows[size] = measure(size, a.runs)
        first, med, p90 = rows[size]
        print(f"{size:>5} {first:>12.2f} {med:>20.2f} {p90:>7.2f}", flush=True)
    print(f"harness_overhead_ms={rows[4][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
