"""Main job: the operator doc's example, verified bit for bit on every rank (emu/cli/dispatch.py;
installed as ``mc2-emu dispatch``).

    python launch/dispatch.py [--nproc-per-node 8] [flags]     (starts itself under torchrun)
    torchrun --nproc-per-node 8 launch/dispatch.py [flags]
    python launch/dispatch.py --help                           (every flag and its valid values)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emu.cli.dispatch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/dispatch.py", script=os.path.abspath(__file__)))
