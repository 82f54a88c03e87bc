"""Cost of tracing: the same dispatch + combine loop with tracing off and on, interleaved.

    torchrun --nproc-per-node 8 scripts/trace_overhead.py [--iters 20] [--h 7168]

Prints the median round-trip time of each mode and their ratio (on / off), measured side by
side in one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.distributed as dist  # noqa: E402

from emu import disable_trace, enable_trace, group_name  # noqa: E402
from emu.testing.failures import run_reporting  # noqa: E402
from emu.testing.scenario import Scenario, run_rank  # noqa: E402


def main() -> int:
    return run_reporting(run)


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--h", type=int, default=7168)
    p.add_argument("--bs", type=int, default=32)
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    me, world = dist.get_rank(), dist.get_world_size()
    sc = Scenario(ep=world, moe=world - 1, shared_ranks=1, k=4, bs=a.bs, h=a.h)
    name = group_name(dist.group.WORLD)
    directory = tempfile.mkdtemp(prefix="emu-trace-") if me == 0 else None
    obj = [directory]
    dist.broadcast_object_list(obj)
    times: dict[str, list[float]] = {"off": [], "on": []}
    run_rank(sc, me, name)                                         # warm up
    for i in range(a.iters):
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
            if mode == "on":
                enable_trace(obj[0])
            dist.barrier()
            t0 = time.perf_counter()
            run_rank(sc, me, name)
            times[mode].append(time.perf_counter() - t0)
            disable_trace()
    med = {m: statistics.median(v) for m, v in times.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, med)
    if me == 0:
        off = statistics.median(g["off"] for g in gathered)
        on = statistics.median(g["on"] for g in gathered)
        print(f"{world} ranks, Bs {a.bs}, H {a.h}, {a.iters} iterations per mode (interleaved)")
        print(f"round trip median: tracing off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms")
        print(f"trace_overhead_ratio={on / off:.3f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
