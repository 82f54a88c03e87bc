"""Run a user's script unchanged on mc2-emu's torch_npu:

    torchrun --nproc-per-node 4 -m emu.npu.run user_script.py args...

Subprocesses the script starts import the same torch_npu (emu/npu/shim is put on PYTHONPATH,
and on sys.path for the children torch.multiprocessing spawns).
With tracing on (EMU_TRACE) every collective is watched too (EMU_WATCH=1), unless EMU_WATCH says
otherwise.
"""
from __future__ import annotations

import os
import runpy
import sys

from ..comm.watching import watch
from . import install


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m emu.npu.run script.py [args...]")
    shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, shim)                            # multiprocessing's spawned children copy sys.path
    install()
    if os.environ.get("EMU_TRACE") and "EMU_WATCH" not in os.environ:
        os.environ["EMU_WATCH"] = "1"                   # subprocesses too
        watch()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
