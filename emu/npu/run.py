"""Run a user's script unchanged on mc2-emu's torch_npu:

    torchrun --nproc-per-node 4 -m emu.npu.run user_script.py args...
"""
from __future__ import annotations

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m emu.npu.run script.py [args...]")
    from . import install
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
