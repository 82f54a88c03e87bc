"""Reading a trace directory: tables, pictures, first divergences, dumps for PyTorch's analyzer.

    python -m emu.debug.report DIR            (or: python scripts/trace_report.py DIR)

From the emulator's records (``rank<r>.jsonl``): a per-rank table, ``DIR/trace.json``
(Perfetto), ``timeline.png`` (one bar per collective, phases marked with ``emu.mark``, call
numbers on the calls' first exchanges), ``traffic.png`` (bytes between ranks, a rank's traffic
to itself apart from the network's) and ``waits.png`` (who waited for whom in the headers).
From the watch records (``watch-rank<r>.jsonl``, ``EMU_WATCH``): the first point where the
ranks of each group part ways, and PyTorch flight-recorder dumps in ``DIR/fr`` for
``torchfrtrace DIR/fr -p rank``.  From a timeout: the stacks the ranks left (``*.stack``).
Pictures need matplotlib (``pip install mc2-emu[report]``).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
from collections import defaultdict

import numpy as np

from .divergence import first_divergences, load_watch
from .events import TraceEvent, load
from .flight import innermost_user_frame
from .frdump import write_dumps
from .trace import aligned_us, merge


def collectives(events: list[TraceEvent]) -> list[TraceEvent]:
    """The collectives among the events (not the phase marks)."""
    return [e for e in events if e.kind != "mark"]


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


def _ranks(events: list[TraceEvent]) -> list[int]:
    return sorted({e.rank for e in events} | {p for e in events for p in e.group_ranks})


def traffic_matrix(events: list[TraceEvent]) -> tuple[list[int], np.ndarray]:
    """(ranks, M) with M[i, j] = bytes rank i sent to rank j over the whole trace."""
    ranks = _ranks(events)
    pos = {r: i for i, r in enumerate(ranks)}
    m = np.zeros((len(ranks), len(ranks)), dtype=np.int64)
    for e in events:
        for peer, rows in zip(e.group_ranks, e.send_rows):
            m[pos[e.rank], pos[peer]] += rows * e.row_bytes
    return ranks, m


def wait_matrix(events: list[TraceEvent]) -> tuple[list[int], np.ndarray]:
    """(ranks, M) with M[i, j] = microseconds rank i waited for rank j at header exchanges
    (what ``performance_info`` accumulates)."""
    ranks = _ranks(events)
    pos = {r: i for i, r in enumerate(ranks)}
    m = np.zeros((len(ranks), len(ranks)), dtype=np.int64)
    for e in events:
        for peer, w in zip(e.group_ranks, e.wait_us or []):
            m[pos[e.rank], pos[peer]] += w
    return ranks, m


def _pyplot():
    """matplotlib's pyplot on the Agg backend (an optional dependency)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(events: list[TraceEvent], path: str) -> None:
    """Ranks x time, one bar per collective, coloured by phase; the phases ``emu.mark`` named
    shaded and labelled; each call's number at its first exchange (d3: dispatch #3)."""
    plt = _pyplot()
    marks = sorted((e for e in events if e.kind == "mark"), key=lambda e: e.t0 + e.anchor)
    events = collectives(events)
    base = min(e.t0 + e.anchor for e in events + marks)
    phases = sorted({f"{e.op} {e.phase}" for e in events})
    colours = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(phases)}
    ranks = sorted({e.rank for e in events})
    end = max(aligned_us(e, e.t1, base) for e in events) / 1e3
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(ranks) + 2.0))
    starts = {}
    for m in marks:                                           # a phase: from its first mark to the next label
        starts.setdefault(m.phase, aligned_us(m, m.t0, base) / 1e3)
    spans = sorted(starts.items(), key=lambda kv: kv[1])
    for i, (label, t) in enumerate(spans):
        stop = spans[i + 1][1] if i + 1 < len(spans) else end
        ax.axvspan(t, stop, color="grey" if i % 2 else "white", alpha=0.12, zorder=0)
        ax.text(t, -0.9, label, fontsize=9, va="bottom", ha="left", color="dimgrey")
    for e in events:
        t0, t1 = aligned_us(e, e.t0, base) / 1e3, aligned_us(e, e.t1, base) / 1e3
        y = ranks.index(e.rank)
        ax.barh(y, max(t1 - t0, 0.005), left=t0, height=0.7, color=colours[f"{e.op} {e.phase}"],
                edgecolor="black" if e.error else "none", zorder=2)
        if e.phase == "EP header":
            ax.text(t0, y, f"{e.op[0]}{e.call}", fontsize=6, va="center", ha="right", zorder=3)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.4, -1.2)
    ax.set_xlabel("time (ms, common clock); d3 / c3: dispatch / combine call 3")
    ax.set_title("mc2-emu collectives per rank")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[p]) for p in phases], labels=phases,
              loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, len(phases)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_matrix(ranks: list[int], m: np.ndarray, title: str, unit: float, off_diagonal: bool):
    """A rank x rank heat map, returned as (figure, axes, pyplot); ``off_diagonal``: the
    diagonal (a rank with itself) is shown apart, outside the colour scale."""
    plt = _pyplot()
    shown = m.astype(float) / unit
    if off_diagonal:
        shown = np.ma.masked_array(shown, mask=np.eye(len(ranks), dtype=bool))
    fig, ax = plt.subplots(figsize=(1.4 + 0.55 * len(ranks), 1.0 + 0.5 * len(ranks)))
    im = ax.imshow(shown, cmap="viridis")
    ax.set_xticks(range(len(ranks)), ranks)
    ax.set_yticks(range(len(ranks)), ranks)
    ax.set_title(title, fontsize=9)
    if len(ranks) <= 16:
        top = float(np.ma.max(shown)) if np.ma.count(shown) else 0.0
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                v = m[i, j] / unit
                self_cell = off_diagonal and i == j
                ax.text(j, i, f"{v:.2f}" + ("\n(self)" if self_cell else ""), ha="center", va="center", fontsize=6,
                        color="black" if self_cell or v >= top / 2 else "white")
    fig.colorbar(im, ax=ax)
    return fig, ax, plt


def plot_traffic(events: list[TraceEvent], path: str) -> None:
    """MB each rank sent (rows) to each rank (columns); a rank's traffic to itself (no network)
    is on the diagonal, outside the colour scale."""
    ranks, m = traffic_matrix(events)
    network, own = int(m.sum() - np.trace(m)), int(np.trace(m))
    fig, ax, plt = _plot_matrix(ranks, m, f"MB sent: {network / 1e6:.2f} over the network, "
                                f"{own / 1e6:.2f} to self (diagonal)", 1e6, off_diagonal=True)
    ax.set_xlabel("to rank")
    ax.set_ylabel("from rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_waits(events: list[TraceEvent], path: str) -> None:
    """Milliseconds each rank (rows) waited for each rank (columns) at header exchanges."""
    ranks, m = wait_matrix(events)
    fig, ax, plt = _plot_matrix(ranks, m, "ms waited for (who waited for whom)", 1e3, off_diagonal=False)
    ax.set_xlabel("waited for rank")
    ax.set_ylabel("rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stacks_left(directory: str) -> list[str]:
    """One line per stack a rank wrote here at a timeout: its file and where its main thread was."""
    lines = []
    for path in sorted(glob.glob(os.path.join(directory, "rank*.stack"))):
        with open(path) as f:
            text = f.read()
        if text.strip():
            lines.append(f"{os.path.basename(path)}: {innermost_user_frame(text) or '?'}")
    return lines


def report(directory: str, pictures: bool = True) -> list[str]:
    """Every finding about ``directory``, as printable lines (pictures written beside)."""
    out = []
    events = load(directory)
    colls = collectives(events)
    if colls:
        out.append(f"{len(colls)} collectives from {len({e.rank for e in colls})} ranks "
                   f"(Perfetto: {merge(directory)})")
        out.append(format_table(rank_table(colls)))
        if pictures and importlib.util.find_spec("matplotlib") is None:
            out.append("no pictures: matplotlib is not installed (pip install -e '.[report]')")
        elif pictures:
            for name, draw, wanted in (("timeline.png", plot_timeline, events), ("traffic.png", plot_traffic, colls),
                                       ("waits.png", plot_waits, colls)):
                draw(wanted, os.path.join(directory, name))
                out.append(f"wrote {os.path.join(directory, name)}")
    watched = load_watch(directory)
    if watched:
        found, hints = first_divergences(watched)
        out.append(f"watch: {sum(len(v) for v in watched.values())} collectives of {len(watched)} ranks; "
                   + ("first divergence per group:" if found else "every group's ranks agree"))
        out += [f"  {d.text}" for d in found] + [f"  hint: {h}" for h in hints]
        fr = os.path.join(directory, "fr")
        os.makedirs(fr, exist_ok=True)
        for old in glob.glob(os.path.join(fr, "rank*")):
            os.unlink(old)
        write_dumps(fr, watched)
        out.append(f"PyTorch flight-recorder dumps: {fr} (torchfrtrace {fr} -p rank)")
    stacks = stacks_left(directory)
    if stacks:
        out.append("stacks written at a timeout:")
        out += [f"  {s}" for s in stacks]
    return out or [f"no trace or watch records in {directory}"]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    p.add_argument("--no-pictures", action="store_true", help="tables and findings only (no matplotlib needed)")
    a = p.parse_args(argv)
    lines = report(a.directory, pictures=not a.no_pictures)
    print("\n".join(lines))
    return 1 if lines[0].startswith("no trace") else 0


if __name__ == "__main__":
    sys.exit(main())
