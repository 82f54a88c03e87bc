"""The benchmark (emu/bench/suite.py; installed as ``mc2-emu bench``):

    python scripts/bench.py --quick          # one point, 8 ranks, < 1 min; last line: ratios
    python scripts/bench.py                  # the sweep -> results/bench.md, .png
    python scripts/bench.py --reference      # the single-process reference from ep 8 to 768
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emu.bench.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench.py"))
