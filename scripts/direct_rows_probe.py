"""What sending rows straight from the caller's tensor would save: one direction of combine's
transport, the op's way against a zero-copy way, interleaved (docs/performance.md).

    torchrun --nproc-per-node 8 scripts/direct_rows_probe.py [--bs 64] [--h 7168] [--iters 40]

slots:  copy every peer's rows into its slot after a header row, one equal all-to-all (the op
        today, with the rows inline);
direct: a header-only all-to-all, then an uneven all-to-all straight from the rows' tensor.
Rank 0 prints each way's median wall time and the process CPU of rank 0 per transfer.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_BYTES = 320


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--h", type=int, default=7168)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--iters", type=int, default=40)
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    peers = dist.get_world_size()
    per = max(a.bs * a.k // peers, 1)                 # rows per peer
    width = 2 * a.h + 16                              # a bf16 wire row with its padding
    y = torch.randn(peers * per, a.h).to(torch.bfloat16)
    send = torch.empty(peers, (per + 2) * width, dtype=torch.uint8)     # header row, rows, metadata row
    recv = torch.empty_like(send)
    head_out = torch.empty(peers, HEADER_BYTES, dtype=torch.uint8)
    head_in = torch.empty_like(head_out)
    out = torch.empty_like(y)

    def slots() -> None:
        rows = send[:, width:width + per * width].reshape(peers, per, width)[:, :, :2 * a.h]
        rows.view(torch.bfloat16).copy_(y.view(peers, per, a.h))
        dist.all_to_all_single(recv, send)

    def direct() -> None:
        dist.all_to_all_single(head_in, head_out)
        dist.all_to_all_single(out, y, [per] * peers, [per] * peers)

    times: dict[str, list[float]] = {"slots": [], "direct": []}
    cpu: dict[str, float] = {"slots": 0.0, "direct": 0.0}
    for fn in (slots, direct):
        for _ in range(5):
            fn()
    for _ in range(a.iters):
        for name, fn in (("slots", slots), ("direct", direct)):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t = torch.tensor([time.perf_counter() - t0])
            cpu[name] += time.process_time() - c0
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(float(t))
    if dist.get_rank() == 0:
        for name in times:
            print(f"{name:6s} {statistics.median(times[name]) * 1e3:8.2f} ms wall  "
                  f"{cpu[name] / a.iters * 1e3:7.2f} ms CPU of rank 0")
        print(f"direct / slots = {statistics.median(times['direct']) / statistics.median(times['slots']):.2f} "
              f"({peers} ranks, {per} rows of H {a.h} per peer)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
