"""Main job: the operator doc's example, verified bit for bit on every rank.

    mc2-emu dispatch [--nproc-per-node 8] [flags]              (starts itself under torchrun)
    python launch/dispatch.py [--nproc-per-node 8] [flags]     (the same, from a checkout)
    torchrun --nproc-per-node 8 launch/dispatch.py [flags]

By default (the doc example, on any world of 2-64 ranks): EP = the world, TP 1, Bs 8, H 7168,
one shared expert on rank 0, one MoE expert on every other rank, K = min(3, E), zero / copy /
const experts one each, bf16; x = 1, every token picks experts 0, 1, 2 with weight 0.1,
identity experts.  Every rank first runs a non-elastic warm-up dispatch + combine; then the
middle of the MoE ranks is removed by elastic scaling (on 8 ranks: ranks 2-5, with
elastic_info = [1, 4, 1, 3, 0, 1, -1, -1, -1, -1, 2, 3, 0, 1, 6, 7, -1, -1, -1, -1]) and
only the survivors run dispatch + combine while the removed ranks idle (--removed idle) or
exit with code 0 (--removed dead).  Every rank that calls the op is compared with the
single-process reference; exit status 0 only if all match.  Any other configuration: the
attribute flags (--data random --tp 2, --quant 2 --smooth ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from functools import partial

from ..testing.failures import run_reporting
from ..testing.jobs import under_torchrun
from ..testing.mainjob import PlanError, plan, precheck, run_job
from ..testing.scenario import Scenario

HELP = {
    "tp": "tp_world_size: 0 or 1 (no TP) or 2 (EP = world / 2, TP groups of 2; one MoE expert per rank)",
    "moe": "moe_expert_num E (default: one MoE expert per MoE rank, EP - shared ranks; EP on A2)",
    "shared": "shared_expert_num N_s, 0-4 (default 1)",
    "shared_ranks": "shared_expert_rank_num S: ranks 0..S-1 host the shared experts (default 1; 0: none)",
    "bs": "tokens per rank Bs, 1-512 (default 8)",
    "h": "hidden size H: 1024-8192 on A3; a multiple of 32 up to 7168 (fullmesh) / 10240 on A2 (default 7168)",
    "k": "experts per token K, 1-16 and <= E (default min(3, E))",
    "quant": "quant_mode: 0 (none) or 2 (dynamic int8) (default 0)",
    "smooth": "with --quant 2: pass smooth scales",
    "comm_quant": "combine's comm_quant_mode: 0 or 2 (int8 on the wire) (default 0)",
    "mask": "x_active_mask: none, 1d (a prefix of the tokens) or 2d (per (token, k) slot) (default none)",
    "global_bs": "global_bs: 0 (Bs * EP) or a multiple of EP >= Bs * EP (default 0)",
    "uneven": "unequal batch sizes (rank r has Bs - (r mod 3) tokens) with global_bs = Bs * EP",
    "token_nums_type": "expert_token_nums_type: 0 (cumulative) or 1 (counts) (default 1)",
    "dtype": "activation dtype (default bf16)",
    "zero": "zero experts (default 1 on A3)", "copy": "copy experts (default 1 on A3)",
    "const": "const experts (default 1 on A3)",
    "special_frac": "share of slots sent to the special experts, with --data random (default 0)",
    "shared_x": "pass shared_expert_x to combine (needs --shared-ranks 0)",
    "seed": "seed of the random data (default 0)",
    "calls": "dispatch + combine pairs per phase, same data (default 1)",
    "data": "doc (x = 1, experts 0..K-1, weight 0.1: the operator doc's data) or random (default doc)",
    "experts": "the experts: identity or scaled (row * (1 + e/64)) (default identity)",
    "soc": "the chip: A3, or A2 (needs a multiple of 8 ranks, >= 16; no shared / special experts, TP, "
           "elastic) (default A3)",
    "comm_alg": "A2: fullmesh (default) or hierarchy; '' lets HCCL_INTRA_PCIE_ENABLE / _ROCE_ENABLE choose",
}
CHOICES = {"mask": ["none", "1d", "2d"], "data": ["doc", "random"], "experts": ["identity", "scaled"],
           "dtype": ["bf16", "fp16"], "soc": ["A3", "A2", "a3", "a2"], "comm_alg": ["", "fullmesh", "hierarchy"],
           "tp": [0, 1, 2], "quant": [0, 2], "comm_quant": [0, 2], "token_nums_type": [0, 1]}
SKIP = ("ep", "removed", "elastic_flag0")


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    """The flags (parsed before torch.distributed starts, so --help works with plain python)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if os.environ.get("LOCAL_RANK", "0") != "0":                  # under torchrun: one rank reports
        p.exit = lambda status=0, message=None: sys.exit(status)
        p.print_usage = p.print_help = lambda file=None: None
    p.add_argument("--nproc-per-node", type=int, default=8,
                   help="ranks to start when run without torchrun (default 8)")
    p.add_argument("--removed", choices=["idle", "dead"], default="idle",
                   help="what the ranks removed by elastic scaling do: idle, or dead (exit with code 0)")
    p.add_argument("--removed-ranks", default=None, metavar="R,R,...",
                   help="MoE ranks removed in the elastic phase (default: the middle of the MoE ranks, at most "
                        "half of them, while K MoE experts survive; 2-5 of 8)")
    p.add_argument("--no-elastic", action="store_true", help="only the warm-up phase, on every rank")
    p.add_argument("--special", action="store_true", help="send every odd token's last slot to a special expert")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="record every collective into DIR (per-rank JSONL + DIR/trace.json for Perfetto)")
    p.add_argument("--traceback", action="store_true",
                   help="print each failing rank's traceback too (default: one line per rank and a summary)")
    for f in dataclasses.fields(Scenario):
        if f.name in SKIP:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
        else:
            p.add_argument(flag, type=type(f.default), default=None, choices=CHOICES.get(f.name), help=HELP[f.name])
    return p.parse_args(argv)


def options(a: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(a).items() if k not in ("nproc_per_node", "traceback")}


def main(argv: list[str] | None = None, prog: str = "mc2-emu dispatch", script: str | None = None) -> int:
    """The main job.  Without torchrun it starts itself under torchrun: ``script`` (a file, e.g.
    launch/dispatch.py) or, by default, this module (``-m emu.cli.dispatch``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    under = "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under else args.nproc_per_node
    try:
        job = plan(world, options(args))
    except PlanError as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if under:
        return run_reporting(partial(lambda p: 0 if run_job(p) else 1, job), args.traceback)
    problem = precheck(job)
    if problem is not None:
        print(f"{prog}: these flags make a call the operator rejects: {problem}", file=sys.stderr)
        return 2
    target = [script] if script else ["-m", __name__]
    return under_torchrun(target, rank_argv(argv), world, args.traceback)


def rank_argv(argv: list[str]) -> list[str]:
    """The flags for the ranks: all but --nproc-per-node."""
    out, skip = [], False
    for a in argv:
        if not skip and a != "--nproc-per-node" and not a.startswith("--nproc-per-node="):
            out.append(a)
        skip = a == "--nproc-per-node"
    return out


if __name__ == "__main__":
    sys.exit(main(prog=os.path.basename(sys.argv[0])))
