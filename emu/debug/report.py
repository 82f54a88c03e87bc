"""Reading a trace: a per-rank table, a timeline picture and a rank x rank traffic heat map.

Input: the events of :func:`emu.debug.events.load` (one per collective per rank).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .events import TraceEvent
from .trace import aligned_us


def rank_table(events: list[TraceEvent]) -> list[dict]:
    """Per rank: op calls, collectives, bytes out / in, total wait (ms) and the slowest peer
    (the source this rank waited for longest in header exchanges)."""
    rows = []
    for r in sorted({e.rank for e in events}):
        mine = [e for e in events if e.rank == r]
        waits: dict[int, float] = defaultdict(float)
        for e in mine:
            for peer, w in zip(e.group_ranks, e.wait_us or []):
                waits[peer] += w
        slow = max(waits.items(), key=lambda kv: kv[1]) if waits else (None, 0.0)
        rows.append(dict(rank=r, calls=len({(e.group, e.op, e.call) for e in mine}), collectives=len(mine),
                         bytes_out=sum(e.bytes_out for e in mine), bytes_in=sum(e.bytes_in for e in mine),
                         wait_ms=sum(waits.values()) / 1e3,
                         comm_ms=sum(e.t1 - e.t0 for e in mine) / 1e6,
                         slowest_peer=slow[0], slowest_wait_ms=slow[1] / 1e3,
                         errors=sum(1 for e in mine if e.error)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'rank':>4} {'calls':>5} {'colls':>5} {'bytes out':>12} {'bytes in':>12} {'comm ms':>8} "
            f"{'wait ms':>8} {'slowest peer':>13} {'errors':>6}")
    lines = [head]
    for r in rows:
        slow = f"{r['slowest_peer']} ({r['slowest_wait_ms']:.1f})" if r["slowest_peer"] is not None else "-"
        lines.append(f"{r['rank']:>4} {r['calls']:>5} {r['collectives']:>5} {r['bytes_out']:>12} {r['bytes_in']:>12} "
                     f"{r['comm_ms']:>8.2f} {r['wait_ms']:>8.2f} {slow:>13} {r['errors']:>6}")
    return "\n".join(lines)


def traffic_matrix(events: list[TraceEvent]) -> tuple[list[int], np.ndarray]:
    """(ranks, M) with M[i, j] = bytes rank i sent to rank j over the whole trace."""
    ranks = sorted({e.rank for e in events} | {p for e in events for p in e.group_ranks})
    pos = {r: i for i, r in enumerate(ranks)}
    m = np.zeros((len(ranks), len(ranks)), dtype=np.int64)
    for e in events:
        for peer, rows in zip(e.group_ranks, e.send_rows):
            m[pos[e.rank], pos[peer]] += rows * e.row_bytes
    return ranks, m


def plot_timeline(events: list[TraceEvent], path: str) -> None:
    """Ranks x time, one bar per collective, coloured by phase (op + phase)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = min(e.t0 + e.anchor for e in events)
    phases = sorted({f"{e.op} {e.phase}" for e in events})
    colours = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(phases)}
    ranks = sorted({e.rank for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(ranks) + 1.8))
    for e in events:
        t0, t1 = aligned_us(e, e.t0, base) / 1e3, aligned_us(e, e.t1, base) / 1e3
        ax.barh(ranks.index(e.rank), max(t1 - t0, 0.005), left=t0, height=0.7,
                color=colours[f"{e.op} {e.phase}"], edgecolor="black" if e.error else "none")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms, common clock)")
    ax.set_title("mc2-emu collectives per rank")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[p]) for p in phases], labels=phases,
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(phases)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_traffic(events: list[TraceEvent], path: str) -> None:
    """Heat map of bytes sent from each rank (rows) to each rank (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks, m = traffic_matrix(events)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(ranks), 0.8 + 0.5 * len(ranks)))
    im = ax.imshow(m / 1e6, cmap="viridis")
    ax.set_xticks(range(len(ranks)), ranks)
    ax.set_yticks(range(len(ranks)), ranks)
    ax.set_xlabel("to rank")
    ax.set_ylabel("from rank")
    ax.set_title("MB sent")
    if len(ranks) <= 16:
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                ax.text(j, i, f"{m[i, j] / 1e6:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < m.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
