"""Main job: one scenario through dispatch -> per-expert function -> combine on every rank,
verified bit for bit against the single-process reference.

    torchrun --nproc-per-node 8 launch/dispatch.py [--tp 2 --quant 2 --mask 2d ...]

EP size = world size / (2 if --tp 2 else 1).  Exits non-zero if any rank differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from emu import group_name  # noqa: E402
from emu.scenario import Scenario, compare, rank_groups, run_rank, run_reference  # noqa: E402


def parse_args(world: int) -> Scenario:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Scenario):
        if f.name == "ep":
            continue
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=f"(default {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f"(default {f.default})")
    args = vars(p.parse_args())
    tp = args["tp"]
    args["ep"] = world // (2 if tp == 2 else 1)
    return Scenario(**args)


def run_and_verify(sc: Scenario) -> bool:
    """Run the scenario on this rank, compare with the reference, print on rank 0."""
    me, world = dist.get_rank(), dist.get_world_size()
    ep_group, tp_group = rank_groups(sc)
    got = run_rank(sc, me, group_name(ep_group), group_name(tp_group) if tp_group is not None else "")
    want = run_reference(sc)[me]
    bad = compare(got, want)
    gathered = [None] * world
    dist.all_gather_object(gathered, (me, got.dispatch[3].tolist(), got.dispatch[4].tolist(),
                                      got.seconds, bad, float(got.x_out.float().abs().sum())))
    if me == 0:
        print(f"scenario: {sc}")
        print(f"{'rank':>4} {'role':>6} {'rows/local expert':>20} {'ep_recv_counts (head)':>28} "
              f"{'bytes in':>10} {'disp ms':>8} {'comb ms':>8}  verdict")
        T = 2 if sc.tp == 2 else 1
        for rank, nums, counts, secs, diff, _ in gathered:
            ep_rank = rank // T
            role = "shared" if ep_rank < sc.shared_ranks else "moe"
            rows = sum(nums) if len(nums) > 1 else nums[0]
            nbytes = rows * sc.h * (1 if sc.quant == 2 else 2)
            head = str(counts[:6])[:-1] + (", ...]" if len(counts) > 6 else "]")
            verdict = "OK (bit-exact)" if not diff else "MISMATCH " + ", ".join(diff)
            print(f"{rank:>4} {role:>6} {str(nums):>20} {head:>28} {nbytes:>10} "
                  f"{secs['dispatch'] * 1e3:>8.1f} {secs['combine'] * 1e3:>8.1f}  {verdict}")
        ok = all(not g[4] for g in gathered)
        print(f"VERDICT: {'PASS' if ok else 'FAIL'}: {sum(not g[4] for g in gathered)}/{world} ranks match the reference")
    return all(not g[4] for g in gathered)


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("EMU_TIMEOUT_S", "60"))))
    ok = run_and_verify(parse_args(dist.get_world_size()))
    # no process-group object may outlive this call, or the interpreter aborts at exit
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
