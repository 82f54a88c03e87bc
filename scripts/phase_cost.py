"""Where the op's own thread goes: thread CPU per phase of a steady dispatch + combine round trip.

    torchrun --nproc-per-node 2 scripts/phase_cost.py [--bs 8] [--h 1024] [--quant 0] [--tp 1] [--calls 1000]

Rank 0 prints each phase's microseconds and calls per round trip (inclusive, costliest first) and
its main thread's CPU per round trip (emu/bench/phases.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from emu.bench.phases import phase_costs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--quant", type=int, default=0, choices=(0, 2))
    p.add_argument("--tp", type=int, default=1, choices=(1, 2))
    p.add_argument("--calls", type=int, default=1000)
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    rows, total = phase_costs(dict(tp=a.tp, bs=a.bs, h=a.h, k=8, quant=a.quant), a.calls)
    if dist.get_rank() == 0:
        for name, us, calls in rows:
            print(f"{us:9.1f} us {calls:5.1f} calls  {name}")
        print(f"main thread: {total:.3f} ms per round trip ({a.calls} round trips)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
