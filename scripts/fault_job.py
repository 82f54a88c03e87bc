"""One rank fails the way ranks fail on a cluster; every other rank must raise, name it, and exit.

    torchrun --nproc-per-node 4 scripts/fault_job.py --fault exit-before [--rank 3] [--no-warmup]

Every rank joins gloo with torch's default timeout (30 minutes, as a user's script does), runs a
warm-up dispatch + combine, then rank ``--rank`` fails while the others run dispatch + combine:

    exit-before    its process exits (code 0) instead of calling dispatch
    dispatch-rows  it dies (code 1) just before dispatch's EP rows exchange (EMU_FAULT; the job
                   runs with EMU_TRANSPORT=split, so that rows travel in an exchange of their own)
    combine-rows   it dies (code 1) just before combine's EP rows exchange (likewise)
    hang           it sleeps forever instead of calling dispatch

Each rank that raises prints one JSON line (``FAULT {...}``: rank, error type, kind, culprits,
every peer's state, seconds from the call to the error, wall clock; also ``--out DIR/rank<r>.json``)
and then leaves through the interpreter's normal exit with code 1.  ``scripts/stress_faults.py`` repeats this.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.distributed as dist  # noqa: E402

import emu  # noqa: E402
from emu.testing.scenario import Scenario, run_rank  # noqa: E402

FAULTS = ("exit-before", "dispatch-rows", "combine-rows", "hang")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fault", choices=FAULTS, required=True)
    p.add_argument("--rank", type=int, default=None, help="the failing rank (default: the last)")
    p.add_argument("--no-warmup", action="store_true", help="fail in the very first call")
    p.add_argument("--out", default=None, metavar="DIR", help="write each record to DIR/rank<r>.json too")
    a = p.parse_args()
    if a.fault in ("dispatch-rows", "combine-rows"):
        os.environ["EMU_TRANSPORT"] = "split"                # every rank, before any call
    dist.init_process_group("gloo")                          # torch's default timeout: 30 minutes
    me, world = dist.get_rank(), dist.get_world_size()
    bad = world - 1 if a.rank is None else a.rank
    sc = Scenario(ep=world, moe=world - 1, shared_ranks=1, k=2, bs=4, h=1024, data="random")
    group = emu.group_name(dist.group.WORLD)
    if not a.no_warmup:
        run_rank(sc, me, group)
    if me == bad and a.fault == "exit-before":
        os._exit(0)
    if me == bad and a.fault == "hang":
        while True:
            time.sleep(3600)
    if a.fault in ("dispatch-rows", "combine-rows"):
        os.environ["EMU_FAULT"] = f"{bad}:{a.fault.split('-')[0]}:EP rows"
    t0 = time.monotonic()
    try:
        run_rank(sc, me, group)
    except emu.EmuError as exc:
        record = json.dumps({
            "rank": me, "type": type(exc).__name__, "kind": exc.kind.name, "culprits": list(exc.culprits),
            "states": {str(r): s.name for r, s in getattr(exc, "states", {}).items()},
            "seconds": round(time.monotonic() - t0, 3), "t": time.time(), "first_line": str(exc).splitlines()[0],
            "message": str(exc)})
        if a.out:
            with open(os.path.join(a.out, f"rank{me}.json"), "w") as f:
                f.write(record)
        print("FAULT " + record, flush=True)
        return 1
    print(f"rank {me}: no error", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
