"""Summarise an mc2-emu trace directory (EMU_TRACE=DIR or launch/dispatch.py --trace DIR).

    python scripts/trace_report.py DIR [--no-pictures]

The same as ``python -m emu.debug.report DIR``: a per-rank table, DIR/trace.json (Perfetto),
DIR/timeline.png, DIR/traffic.png and DIR/waits.png; with watch records (EMU_WATCH), the first
divergence of every group and PyTorch flight-recorder dumps in DIR/fr; the stacks ranks left
at a timeout.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emu.debug.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
