"""Summarise an mc2-emu trace directory (EMU_TRACE=DIR or launch/dispatch.py --trace DIR).

    python scripts/trace_report.py DIR

Prints a per-rank table and writes DIR/trace.json (Perfetto), DIR/timeline.png and
DIR/traffic.png.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emu.debug import events, report, trace  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    a = p.parse_args()
    records = events.load(a.directory)
    if not records:
        print(f"no trace events in {a.directory}")
        return 1
    print(f"{len(records)} collectives from {len({e.rank for e in records})} ranks "
          f"(Perfetto: {trace.merge(a.directory)})")
    print(report.format_table(report.rank_table(records)))
    for name, draw in (("timeline.png", report.plot_timeline), ("traffic.png", report.plot_traffic)):
        path = os.path.join(a.directory, name)
        draw(records, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
