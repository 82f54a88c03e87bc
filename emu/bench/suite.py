"""Benchmark: mc2-emu against the floor (a raw all_to_all_single of the same bytes) and a
Megatron-style dispatcher, side by side in one run on the same world and data.

    mc2-emu bench --quick        # (or python scripts/bench.py) one point, 8 ranks, < 1 min; last line: ratios
    mc2-emu bench                # the sweep: ranks 2/4/8, Bs 8-256, H 1024/7168, K 8, quant 0/2,
                                 # tp 1/2 -> results/bench.md, .png (in the current directory)
    mc2-emu bench --reference    # the single-process reference from ep 8 to 768

Without torchrun it launches itself under torchrun for each world size.  Times are medians
over repeats of the slowest rank; ratios are ours / baseline (round trip = dispatch + combine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import api
from ..a3 import native
from ..comm.context import current
from ..core.attrs import Geometry, MoeConfig
from ..core.plan import active_set, send_plan
from ..testing.failures import run_reporting
from .baseline import MegatronStyleDispatcher

WARMUP = 3                  # untimed round trips of every variant at each point
RESULTS = os.environ.get("EMU_BENCH_RESULTS", "results")     # relative to the current directory
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def points(world: int, quick: bool) -> list[dict]:
    if quick:
        return [dict(tp=1, bs=int(os.environ.get("BENCH_BS", "128")), h=7168, k=8, quant=0)]
    out = []
    for tp in (1, 2):
        if tp == 2 and world < 4:
            continue
        for h in (1024, 7168):
            for quant in (0, 2):
                for bs in (8, 64, 256):
                    out.append(dict(tp=tp, bs=bs, h=h, k=8, quant=quant))
    return out


def run_world(quick: bool, repeats: int) -> None:
    """Under torchrun: every point of this world size; rank 0 writes results/bench_w<N>.json."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    me, world = dist.get_rank(), dist.get_world_size()
    rows = [bench_point(pt, repeats) for pt in points(world, quick)]
    if me == 0:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"bench_w{world}{'_quick' if quick else ''}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


@dataclass
class Point:
    """One benchmark point on this world: its groups (to destroy when done), the op's keywords,
    this rank's inputs and the expert outputs combine sends back."""

    groups: list
    kw: dict
    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    y: torch.Tensor
    quant: int
    tp: int

    def round_trip(self) -> tuple[float, float]:
        """One dispatch + combine; (dispatch s, combine s)."""
        t0 = time.perf_counter()
        o = api.moe_distribute_dispatch_v2(self.x, self.ids, quant_mode=self.quant, **self.kw)
        t1 = time.perf_counter()
        api.moe_distribute_combine_v2(self.y, self.ids, o[2], o[4], self.w,
                                      tp_send_counts=o[5] if self.tp == 2 else None, **self.kw)
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        for grp in self.groups:
            dist.destroy_process_group(grp)


def make_point(pt: dict) -> Point:
    """The groups and data of ``pt`` (tp 1 or 2; tp 2 has one expert per rank, else every rank
    holds ceil(8 / EP) experts), seeded by rank; one untimed dispatch sizes combine's input."""
    me, world = dist.get_rank(), dist.get_world_size()
    T = 2 if pt["tp"] == 2 else 1
    ep = world // T
    ep_rank, tp_rank = divmod(me, T)
    ep_groups = [dist.new_group([e * T + i for e in range(ep)]) for i in range(T)]
    tp_groups = [dist.new_group([e * T, e * T + 1]) for e in range(ep)] if T == 2 else []
    ep_g = ep_groups[tp_rank]
    tp_g = tp_groups[ep_rank] if T == 2 else None
    moe = ep if T == 2 else ep * -(-8 // ep)
    k = min(pt["k"], moe)
    g = torch.Generator().manual_seed(me)
    x = torch.randn(pt["bs"], pt["h"], generator=g).to(torch.bfloat16)
    ids = torch.rand(pt["bs"], moe, generator=g).argsort(1)[:, :k].to(torch.int32)
    w = torch.rand(pt["bs"], k, generator=g)
    kw = dict(group_ep=ep_g, ep_world_size=ep, ep_rank_id=ep_rank, moe_expert_num=moe,
              group_tp=tp_g if tp_g is not None else "", tp_world_size=pt["tp"], tp_rank_id=tp_rank,
              shared_expert_rank_num=0)
    outs = api.moe_distribute_dispatch_v2(x, ids, quant_mode=pt["quant"], **kw)
    y = torch.randn(outs[0].shape, generator=g).to(torch.bfloat16)
    return Point(ep_groups + tp_groups, kw, x, ids, w, y, pt["quant"], pt["tp"])


def bench_point(pt: dict, repeats: int) -> dict:
    """One point on this world: ours, the raw all-to-all and the Megatron-style dispatcher,
    interleaved; returns the medians (slowest rank per repeat).  Its groups are destroyed on
    return (no group object may outlive destroy_process_group)."""
    me, world = dist.get_rank(), dist.get_world_size()
    point = make_point(pt)
    kw, x, ids, w = point.kw, point.x, point.ids, point.w
    T = 2 if pt["tp"] == 2 else 1
    ep = world // T
    ep_rank, tp_rank = divmod(me, T)
    ep_g, tp_g = kw["group_ep"], kw["group_tp"] or None
    moe, k = kw["moe_expert_num"], ids.shape[1]
    # bytes each rank sends in dispatch (payload rows) and their split sizes
    geom = Geometry.of(MoeConfig(ep_world_size=ep, moe_expert_num=moe, tp_world_size=pt["tp"],
                                 shared_expert_rank_num=0), pt["bs"], k, pt["h"])
    counts = send_plan(geom, ep_rank, ids, active_set(pt["bs"], k, None)).counts
    row_bytes = pt["h"] * (1 if pt["quant"] == 2 else 2) + (4 if pt["quant"] == 2 else 0)
    comb_bytes = pt["h"] * 2
    recv = torch.empty(ep, dtype=torch.int64)
    dist.all_to_all_single(recv, torch.from_numpy(counts), group=ep_g)
    recv = recv.numpy()
    own = int(recv.sum())
    peer_own = torch.tensor([own])
    if T == 2:
        both = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        dist.all_gather(both, peer_own, group=tp_g)
        peer_own = int(both[1 - tp_rank])
    d_send = torch.empty(int(counts.sum()) * row_bytes, dtype=torch.uint8)
    d_recv = torch.empty(own * row_bytes, dtype=torch.uint8)
    c_send = torch.empty(own * comb_bytes, dtype=torch.uint8)
    c_recv = torch.empty(int(counts.sum()) * comb_bytes, dtype=torch.uint8)
    if T == 2:
        tp_send = torch.empty(own * row_bytes, dtype=torch.uint8)
        tp_recv = torch.empty(int(peer_own) * row_bytes, dtype=torch.uint8)

    def raw():
        dist.all_to_all_single(d_recv, d_send, [int(c) * row_bytes for c in recv],
                               [int(c) * row_bytes for c in counts], group=ep_g)
        if T == 2:                                  # TP all-gather and reduce-scatter of the rows
            dist.all_to_all_single(tp_recv, tp_send, [int(peer_own) * row_bytes if i != tp_rank else 0
                                                      for i in range(2)],
                                   [own * row_bytes if i != tp_rank else 0 for i in range(2)], group=tp_g)
            dist.all_to_all_single(tp_send, tp_recv, [own * row_bytes if i != tp_rank else 0 for i in range(2)],
                                   [int(peer_own) * row_bytes if i != tp_rank else 0 for i in range(2)],
                                   group=tp_g)
        dist.all_to_all_single(c_recv, c_send, [int(c) * comb_bytes for c in counts],
                               [int(c) * comb_bytes for c in recv], group=ep_g)

    ours = point.round_trip

    def with_env(name: str):
        def run():
            saved = os.environ.get(name)
            os.environ[name] = "0"
            try:
                ours()
            finally:
                if saved is None:
                    del os.environ[name]
                else:
                    os.environ[name] = saved
        return run

    general = with_env("EMU_FASTPATH")       # ours with every check on every call
    python = with_env("EMU_NATIVE")          # ours without the native accelerator

    mega = MegatronStyleDispatcher(ep_g, moe, tp_g)

    def megatron():
        expert_rows, r = mega.dispatch(x, ids)
        mega.combine(expert_rows, w, r, pt["bs"])

    timings: dict[str, list[float]] = {"dispatch": [], "combine": [], "ours": [], "raw": [], "megatron": [],
                                       "general": [], "python": []}
    ours()                            # a group's first combine sizes its slot: count the steady state
    n0 = current().collectives_issued
    ours()
    calls_collectives = (current().collectives_issued - n0) / 2
    m0 = mega.collectives
    megatron()
    mega_collectives = (mega.collectives - m0) / 2
    for _ in range(WARMUP):                # every variant warm before timing: a fresh world's first
        for fn in (raw, ours, megatron, general, python):     # calls pay lazy set-up and cold caches
            fn()
    steady_calls = 0
    for _ in range(repeats):
        for name, fn in (("raw", raw), ("ours", ours), ("megatron", megatron), ("general", general),
                         ("python", python)):
            dist.barrier()
            s0 = current().steady_calls
            t0 = time.perf_counter()
            parts = fn()
            dt = time.perf_counter() - t0
            if name == "ours":
                steady_calls += current().steady_calls - s0
            both = torch.tensor([dt] + list(parts or (0.0, 0.0)), dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            timings[name].append(float(both[0]))
            if name == "ours":
                timings["dispatch"].append(float(both[1]))
                timings["combine"].append(float(both[2]))
    steady = steady_calls / (2 * repeats)          # share of ours' timed op calls on the steady path
    med = {n: statistics.median(v) for n, v in timings.items()}
    moved = torch.tensor([float(d_send.numel() + c_send.numel())])
    dist.all_reduce(moved)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    row = (dict(ranks=world, **{**pt, "k": k}, moe=moe, repeats=repeats,
                     dispatch_ms=med["dispatch"] * 1e3, combine_ms=med["combine"] * 1e3,
                     ours_ms=med["ours"] * 1e3, raw_ms=med["raw"] * 1e3, megatron_ms=med["megatron"] * 1e3,
                     ratio_vs_a2a=med["ours"] / med["raw"], ratio_vs_megatron=med["ours"] / med["megatron"],
                     gbps=float(moved) / med["ours"] / 1e9, collectives_per_call=calls_collectives,
                     megatron_collectives_per_call=mega_collectives, steady_share=steady,
                     general_ms=med["general"] * 1e3, steady_gain=med["general"] / med["ours"],
                     python_ms=med["python"] * 1e3, native_gain=med["python"] / med["ours"], native=native.status(),
                     payload_mb_per_rank=float(moved) / world / 1e6, peak_rss_mb=float(rss)))
    if me == 0:
        print(json.dumps(row), flush=True)
    point.close()
    return row


def launch(world: int, quick: bool, repeats: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "-m", __name__,
           "--repeats", str(repeats), "--bs", os.environ.get("BENCH_BS", "128")] + (["--quick"] if quick else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p))          # the ranks import this emu
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL if quick else None)
    with open(os.path.join(RESULTS, f"bench_w{world}{'_quick' if quick else ''}.json")) as f:
        return json.load(f)


def table(rows: list[dict]) -> str:
    head = ("| ranks | tp | Bs | H | K | quant | dispatch ms | combine ms | round trip ms | raw a2a ms | "
            "megatron-style ms | vs a2a | vs megatron | GB/s | collectives/call (ours, megatron) | steady | "
            "general path ms | without native ms | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['tp']} | {r['bs']} | {r['h']} | {r['k']} | {r['quant']} | "
                     f"{r['dispatch_ms']:.1f} | {r['combine_ms']:.1f} | {r['ours_ms']:.1f} | {r['raw_ms']:.1f} | "
                     f"{r['megatron_ms']:.1f} | {r['ratio_vs_a2a']:.2f} | {r['ratio_vs_megatron']:.2f} | "
                     f"{r['gbps']:.2f} | {r['collectives_per_call']:g}, {r['megatron_collectives_per_call']:g} | "
                     f"{r.get('steady_share', 0):.0%} | {r.get('general_ms', 0):.1f} | {r.get('python_ms', 0):.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "ratio_vs_a2a", "round trip / raw all-to-all (lower is better)"),
                           (axes[1], "ratio_vs_megatron", "round trip / Megatron-style (lower is better)")):
        for (ranks, tp, h, quant) in sorted({(r["ranks"], r["tp"], r["h"], r["quant"]) for r in rows}):
            pts = sorted((r["bs"], r[key]) for r in rows if (r["ranks"], r["tp"], r["h"], r["quant"]) == (ranks, tp, h, quant))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{ranks} ranks tp{tp} H{h} q{quant}", alpha=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Bs (tokens per rank)")
        ax.set_title(title, fontsize=10)
        ax.axhline(1.0, color="grey", lw=0.8)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reference_scaling() -> None:
    """The single-process reference from ep 8 to 768 (Bs 8, K 8, moe = ep, H 64): time and
    peak memory, each size in a fresh process."""
    print("| ep | seconds | peak RSS MB |\n|---|---|---|")
    for ep in (8, 32, 128, 384, 768):
        code = ("import time, resource\n"
                "from emu.testing.scenario import Scenario, run_reference\n"
                "sc = Scenario(ep=%d, moe=%d, shared_ranks=0, k=8, bs=8, h=64)\n"
                "t = time.perf_counter(); run_reference(sc); dt = time.perf_counter() - t\n"
                "print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)") % (ep, ep)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        print(f"| {ep} | {float(out[0]):.2f} | {float(out[1]):.0f} |", flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--bs", type=int, default=128, help="--quick: tokens per rank (8: decode)")
    a = p.parse_args(argv)
    os.environ["BENCH_BS"] = str(a.bs)                # read by points() on the ranks too
    repeats = a.repeats or (7 if a.quick else 15)
    if "RANK" in os.environ:                       # a rank: one line per error, not a traceback
        return run_reporting(lambda: run_world(a.quick, repeats) or 0)
    if a.reference:
        reference_scaling()
        return 0
    if a.quick:
        r = launch(8, True, repeats)[0]
        print(table([r]))
        print(f"ratio_vs_a2a={r['ratio_vs_a2a']:.3f} ratio_vs_megatron={r['ratio_vs_megatron']:.3f} "
              f"collectives_per_call={r['collectives_per_call']:g} steady_gain={r['steady_gain']:.3f} "
              f"native_gain={r['native_gain']:.3f} native={r['native']!r}")
        return 0
    rows = []
    for world in [int(w) for w in a.ranks.split(",")]:
        rows += launch(world, False, repeats)
    os.makedirs(RESULTS, exist_ok=True)
    md = table(rows)
    with open(os.path.join(RESULTS, "bench.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(RESULTS, "bench.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
