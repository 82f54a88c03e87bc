"""Capacity: the main job from 8 to 128 ranks on this machine, with its time and memory.

    python scripts/scale.py                       # 8, 16, 32, 64 ranks and 128 as two nodes of 64
    python scripts/scale.py --ranks 8,32 --no-two-nodes

Each size runs ``launch/dispatch.py --data random`` (every rank verified, an elastic phase)
under torchrun; 128 ranks run as two torchrun "nodes" of 64 on this host, joined by the c10d
rendezvous on 127.0.0.1, as two machines would be.  While a job runs, this script samples the
machine's used memory (``/proc/meminfo``: MemTotal - MemAvailable, minus the idle baseline)
and every rank's proportional set size (``/proc/<pid>/smaps_rollup``: shared library pages
counted once across processes).  It prints one markdown table row per size: wall time, the
median milliseconds of one dispatch + combine per rank (the third call of the warm-up phase), peak memory in total
and per rank, and the job's verdict.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = [os.path.join(ROOT, "launch", "dispatch.py"), "--data", "random", "--calls", "3"]


def used_mb() -> float:
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else 0.0
    except OSError:
        return 0.0


def ranks_of(parents: list[int]) -> list[int]:
    """The rank processes: children of the torchrun processes."""
    out = []
    for parent in parents:
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


class Sampler(threading.Thread):
    """Peak machine memory above ``baseline`` and peak per-rank PSS while the job runs."""

    def __init__(self, parents: list[int], baseline: float):
        super().__init__(daemon=True)
        self.parents, self.baseline = parents, baseline
        self.peak_total, self.peak_rank, self.running = 0.0, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak_total = max(self.peak_total, used_mb() - self.baseline)
            pss = [pss_mb(p) for p in ranks_of(self.parents)]
            if pss:
                self.peak_rank = max(self.peak_rank, max(pss))
            time.sleep(0.25)


def run(ranks: int, nodes: int, port: int) -> dict:
    per_node = ranks // nodes
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nodes == 1:
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] + JOB]
    else:
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
                 str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", f"scale{ranks}"] + JOB for _ in range(nodes)]
    baseline = used_mb()
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for c in cmds]
    sampler = Sampler([p.pid for p in procs], baseline)
    sampler.start()
    outs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - t0
    sampler.running = False
    sampler.join()
    text = "\n".join(outs)
    warm = text.split("== elastic")[0]
    ms = [float(m) for m in re.findall(r"\s([\d.]+)\s+OK \(bit-exact\)", warm)]
    verdicts = re.findall(r"^(warm-up|elastic).*?: (PASS|FAIL): (\d+)/(\d+)", text, re.M)
    ok = all(p.returncode == 0 for p in procs) and len(verdicts) == 2 and all(v[1] == "PASS" for v in verdicts)
    if not ok:
        print(text[-3000:], file=sys.stderr)
    return dict(ranks=ranks, nodes=nodes, wall_s=wall, ms=statistics.median(ms) if ms else float("nan"),
                total_gb=sampler.peak_total / 1024, rank_mb=sampler.peak_rank, ok=ok,
                verified=sum(int(v[2]) for v in verdicts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="8,16,32,64", help="single-node sizes")
    p.add_argument("--no-two-nodes", action="store_true", help="skip 128 ranks as two nodes of 64")
    p.add_argument("--port", type=int, default=29613, help="the two-node rendezvous port on 127.0.0.1")
    a = p.parse_args()
    sizes = [(int(r), 1) for r in a.ranks.split(",") if r] + ([] if a.no_two_nodes else [(128, 2)])
    print("| ranks | torchrun nodes | wall s | ms per dispatch + combine (median rank) | peak GB total | "
          "peak MB per rank (PSS) | verified |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for ranks, nodes in sizes:
        r = run(ranks, nodes, a.port)
        ok = ok and r["ok"]
        print(f"| {r['ranks']} | {r['nodes']} | {r['wall_s']:.0f} | {r['ms']:.1f} | {r['total_gb']:.1f} | "
              f"{r['rank_mb']:.0f} | {'PASS' if r['ok'] else 'FAIL'} ({r['verified']} rank checks) |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
