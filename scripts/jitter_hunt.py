"""Shake out ordering races with EMU_JITTER_MS: run a racy client and a correct one over many
jitter seeds, under the strict watch, and count the failures.

    python scripts/jitter_hunt.py [--seeds 10] [--ms 20] [--ranks 4]

The racy client (tests/watch_clients.py: metrics_thread_race) all-reduces metrics from a
second thread on the MoE layer's group after each step, while the main thread runs a 10 ms
optimizer step and the next dispatch: without delays the all-reduce always comes first, with
delays of up to ``--ms`` before each collective the order may differ between ranks.  Prints one line per (client, jitter)
and ends with ``jitter_hunt: racy fails A/N with jitter, B/N without; correct fails C/N with jitter``.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import emu.testing as et  # noqa: E402
import watch_clients as wc  # noqa: E402


def hunt(pool: et.WorldPool, spec: et.WorldSpec, client, ms: float, seeds: int) -> int:
    """Failures of ``client`` over ``seeds`` jitter seeds (a world that failed is replaced)."""
    fails = 0
    for seed in range(seeds):
        world = pool.get(spec)
        world.run(wc.jitter, ms, seed)
        try:
            failed = not all(o.ok for o in world.run(client, deadline_s=30))
        except et.WorldHung:
            failed = True
        if failed:
            fails += 1
            pool.taint(spec)
    return fails


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--ms", type=float, default=20.0)
    p.add_argument("--ranks", type=int, default=4)
    a = p.parse_args()
    spec = et.WorldSpec.of(a.ranks, env={"EMU_WATCH": "strict"}, emu_timeout=5)
    pool = et.WorldPool()
    counts = {}
    try:
        for name, client in (("correct", wc.correct_client), ("racy", wc.metrics_thread_race)):
            for ms in (0.0, a.ms):
                counts[name, ms] = hunt(pool, spec, client, ms, a.seeds)
                print(f"{name:>8} client, jitter {ms:g} ms: {counts[name, ms]}/{a.seeds} seeds fail", flush=True)
    finally:
        pool.close()
    n = a.seeds
    print(f"jitter_hunt: racy fails {counts['racy', a.ms]}/{n} with jitter, {counts['racy', 0.0]}/{n} without; "
          f"correct fails {counts['correct', a.ms]}/{n} with jitter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
