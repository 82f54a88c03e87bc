"""Main job: the operator doc's example, verified bit for bit on every rank.

    torchrun --nproc-per-node 8 launch/dispatch.py [--removed idle|dead] [--special] [--no-elastic] ...

By default (the doc example): EP 8, TP 1, Bs 8, H 7168, K 3, one shared expert on rank 0,
7 MoE experts, zero/copy/const one each, bf16, x = 1, every token picks experts 0, 1, 2
with weight 0.1, identity experts.  Every rank first runs a non-elastic warm-up dispatch +
combine; then only ranks {0, 1, 6, 7} run dispatch + combine with
elastic_info = [1, 4, 1, 3, 0, 1, -1, -1, -1, -1, 2, 3, 0, 1, 6, 7, -1, -1, -1, -1]
while ranks 2-5 idle (--removed idle) or exit with code 0 (--removed dead).  Every rank that
calls the op is compared with the single-process reference; exit status 0 only if all match.
Any other configuration: --data random --no-elastic plus the attribute flags (--tp 2, --quant 2 ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import timedelta
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.distributed as dist  # noqa: E402
from torch.distributed import distributed_c10d as c10d  # noqa: E402

from emu import disable_trace, enable_trace, group_name, mark  # noqa: E402
from emu.debug.trace import merge  # noqa: E402
from emu.testing.failures import run_reporting  # noqa: E402
from emu.testing.scenario import Scenario, compare, rank_groups, run_rank, run_reference, summary  # noqa: E402

DOC_EXAMPLE = dict(moe=7, shared=1, shared_ranks=1, bs=8, h=7168, k=3, zero=1, copy=1, const=1,
                   data="doc", experts="identity")


def parse_args() -> argparse.Namespace:
    """The flags (parsed before torch.distributed starts, so --help works with plain python)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--removed", choices=["idle", "dead"], default="idle",
                   help="what the ranks removed by elastic scaling do (default idle)")
    p.add_argument("--removed-ranks", default=None,
                   help="EP ranks removed by elastic scaling (default: the middle half, 2-5 of 8)")
    p.add_argument("--no-elastic", action="store_true", help="only the warm-up call on every rank")
    p.add_argument("--special", action="store_true", help="send odd tokens' last slot to the special experts")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="record every collective into DIR (per-rank JSONL + DIR/trace.json for Perfetto)")
    p.add_argument("--traceback", action="store_true",
                   help="print each failing rank's traceback too (default: one line per rank and a summary)")
    for f in dataclasses.fields(Scenario):
        if f.name in ("ep", "removed", "elastic_flag0"):
            continue
        default = DOC_EXAMPLE.get(f.name, f.default)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=default, help=f"(default {default})")
        else:
            p.add_argument(flag, type=type(f.default), default=default, help=f"(default {default})")
    return p.parse_args()


def scenario(a: argparse.Namespace, world: int) -> Scenario:
    """The scenario of the flags on a world of ``world`` ranks."""
    a.soc = a.soc.upper()
    if a.soc == "A2":                       # A2: no shared experts, special experts, TP or elastic
        a.shared_ranks, a.zero, a.copy, a.const, a.no_elastic = 0, 0, 0, 0, True
        a.comm_alg = a.comm_alg or "fullmesh"
        if a.moe % world:
            a.moe = world * max(1, a.moe // world)
        os.environ["EMU_SOC"] = "A2"
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(Scenario)
              if f.name not in ("ep", "removed", "elastic_flag0")}
    fields["ep"] = world // (2 if a.tp == 2 else 1)
    if a.special:
        fields["special_frac"] = 1.0
    return Scenario(**fields)


def removed_ranks(sc: Scenario, args: argparse.Namespace) -> str:
    if args.no_elastic or sc.tp == 2:
        return ""
    if args.removed_ranks is not None:
        return args.removed_ranks
    return ",".join(map(str, range(sc.ep // 4, sc.ep - sc.ep // 4)))


def run_phase(sc: Scenario, label: str, store, group_ep, group_tp) -> bool:
    """Run ``sc`` on the ranks that call the op, verify each, report through the store; the
    lowest calling rank prints the table.  Returns whether every calling rank matched."""
    me = dist.get_rank()
    callers = sc.survivors()
    got = run_rank(sc, me, group_ep, group_tp)
    want = run_reference(sc)[me]
    row = summary(sc, me, got, compare(got, want))
    store.set(f"emu_main/{label}/{me}", json.dumps(row))
    if me == callers[0]:
        rows = [json.loads(store.get(f"emu_main/{label}/{g}")) for g in callers]
        print(f"\n== {label}: {len(callers)} ranks call the op: {callers}")
        print(f"{'rank':>4} {'id':>3} {'role':>6} {'expert_token_nums':>18} {'ep_recv_counts (head)':>26} "
              f"{'first triples':>28} {'x_out[0,:3]':>28} {'ms':>6}  verdict")
        for r in rows:
            print(f"{r['rank']:>4} {r['id']:>3} {r['role']:>6} {str(r['token_nums']):>18} {r['counts']:>26} "
                  f"{r['triples']:>28} {str(r['x_out']):>28} {r['ms']:>6.1f}  {r['verdict']}")
        ok = all(r["ok"] for r in rows)
        print(f"{label}: {'PASS' if ok else 'FAIL'}: {sum(r['ok'] for r in rows)}/{len(rows)} ranks match the reference")
        store.set(f"emu_main/{label}/verdict", "1" if ok else "0")
    return store.get(f"emu_main/{label}/verdict") == b"1"


def run_job(args: argparse.Namespace) -> int:
    """The job on this rank: exit status 0 only if every rank that called the op matched."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("EMU_TIMEOUT_S", "60"))))
    me = dist.get_rank()
    sc = scenario(args, dist.get_world_size())
    if args.trace:
        enable_trace(args.trace)
    store = c10d._get_default_store()
    ep_group, tp_group = rank_groups(sc)
    ep_name, tp_name = group_name(ep_group), group_name(tp_group) if tp_group is not None else ""
    del ep_group, tp_group                  # no group object may outlive destroy_process_group()
    mark("warm-up")
    ok = run_phase(sc, "warm-up (every rank, no elastic_info)", store, ep_name, tp_name)
    gone = removed_ranks(sc, args)
    if gone:
        elastic = dataclasses.replace(sc, removed=gone)
        if me in elastic.survivors():
            mark("elastic")
            ok = run_phase(elastic, f"elastic (ranks {gone} removed, {args.removed})", store, ep_name, "") and ok
        elif args.removed == "dead":
            print(f"rank {me}: removed, exiting with code 0", flush=True)
            os._exit(0)
        else:
            label = f"elastic (ranks {gone} removed, {args.removed})"
            store.wait([f"emu_main/{label}/verdict"], timedelta(seconds=float(os.environ.get("EMU_TIMEOUT_S", "60"))))
            ok = store.get(f"emu_main/{label}/verdict") == b"1" and ok
    if args.trace:
        disable_trace()
        store.set(f"emu_main/traced/{me}", "1")
        if me == 0:
            callers = elastic.survivors() if gone and args.removed == "dead" else range(dist.get_world_size())
            store.wait([f"emu_main/traced/{g}" for g in callers])
            print(f"\ntrace: {merge(args.trace)} (python scripts/trace_report.py {args.trace})")
    time.sleep(0.05)
    dist.destroy_process_group()
    return 0 if ok else 1


def main() -> int:
    args = parse_args()
    return run_reporting(partial(run_job, args), args.traceback)


if __name__ == "__main__":
    sys.exit(main())
