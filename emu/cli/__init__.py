"""The ``mc2-emu`` command (a console entry point of the package):

    mc2-emu dispatch [--nproc-per-node 8] [flags]   the main job: the operator doc's example, every rank
                                                    checked bit for bit (launch/dispatch.py in a checkout)
    mc2-emu run [--nproc-per-node N] script.py ...  a torch_npu script unchanged on the drop-in torch_npu
                                                    (python -m emu.npu.run; under torchrun with N ranks)
    mc2-emu report DIR                              the trace / collective-order report of a traced job
                                                    (python -m emu.debug.report)
    mc2-emu bench [--quick]                         the benchmark (scripts/bench.py in a checkout)
    mc2-emu --version

Each subcommand's ``--help`` lists its flags.
"""
from __future__ import annotations

import sys

from .. import __version__
from ..bench import suite
from ..debug import report
from ..npu import run
from ..testing.jobs import under_torchrun
from . import dispatch

COMMANDS = ("dispatch", "run", "report", "bench")


def _run(argv: list[str]) -> int:
    """``mc2-emu run [--nproc-per-node N] script.py args...``."""
    if argv[:1] == ["--nproc-per-node"] and len(argv) >= 3:
        return under_torchrun(["-m", run.__name__], argv[2:], int(argv[1]), show_stderr=True)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mc2-emu run [--nproc-per-node N] script.py [args...]\n\n" + (run.__doc__ or ""))
        return 0 if argv else 2
    sys.argv = ["mc2-emu run", *argv]
    run.main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mc2-emu {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "dispatch":
        return dispatch.main(rest, prog="mc2-emu dispatch")
    if cmd == "run":
        return _run(rest)
    if cmd == "report":
        return report.main(rest, prog="mc2-emu report")
    if cmd == "bench":
        return suite.main(rest, prog="mc2-emu bench")
    print(f"mc2-emu: unknown command {cmd!r}; one of {', '.join(COMMANDS)} (mc2-emu --help)", file=sys.stderr)
    return 2
