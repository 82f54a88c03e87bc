"""What watching every collective (EMU_WATCH=1, record only) costs, measured side by side:
the bench's quick point and the main job, each run alternately without and with the watch.

    python scripts/watch_overhead.py [--rounds 3]

Bench: the median round trip (dispatch + combine, 8 ranks, Bs 128, H 7168) of each run; main
job: the median over ranks and phases of each rank's dispatch + combine time.  Prints the
medians of each mode and ``watch_overhead_bench=... watch_overhead_main=...`` (with / without).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def bench_round_trip(watch: bool) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", EMU_WATCH="1" if watch else "")
    subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick"], check=True, env=env,
                   capture_output=True, text=True)
    with open(os.path.join(ROOT, "results", "bench_w8_quick.json")) as f:
        return json.load(f)[0]["ours_ms"]


def main_job_ms(watch: bool) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", EMU_WATCH="1" if watch else "")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8",
                          os.path.join(ROOT, "launch", "dispatch.py")], check=True, env=env, capture_output=True,
                         text=True).stdout
    ms = [float(m.group(1)) for m in re.finditer(r"\]\s+([0-9.]+)\s+OK \(bit-exact\)", out)]
    return statistics.median(ms)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    got: dict[tuple[str, bool], list[float]] = {}
    for i in range(a.rounds):
        for watch in ((False, True) if i % 2 == 0 else (True, False)):
            got.setdefault(("bench", watch), []).append(bench_round_trip(watch))
            got.setdefault(("main", watch), []).append(main_job_ms(watch))
            print(f"round {i + 1} watch={'on' if watch else 'off'}: bench {got['bench', watch][-1]:.1f} ms, "
                  f"main job {got['main', watch][-1]:.1f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    for what in ("bench", "main"):
        print(f"{what}: without watch {med[what, False]:.1f} ms, with {med[what, True]:.1f} ms")
    print(f"watch_overhead_bench={med['bench', True] / med['bench', False]:.3f} "
          f"watch_overhead_main={med['main', True] / med['main', False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
