"""One line per failing rank and one summary line, instead of a traceback per rank.

:func:`run_reporting` runs a rank's ``main``; if it raises, the rank prints one line (the
error class, its code or kind, the first line of its message), and the first rank to fail
also prints, once the others have had a moment to report, a summary of every rank's cause
(the others wait for it: under torchrun, the first rank to exit with an error gets the rest
killed)::

    rank 2: CollectiveError (dead peer, culprits [3]): dispatch #3 EP rows ... rank 3 is dead.
    FAIL: 3 of 4 ranks raised: rank 3 is dead (ranks 0-2)

``--traceback`` (or ``EMU_TRACEBACK=1``) prints the tracebacks as well.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..core.errors import AclnnError, CollectiveError, EmuError
from ..core.ranks import spans

_COUNT = "emu_fail/count"
_DONE = "emu_fail/summarised"


def _say(line: str) -> None:
    """One line in one write: lines of ranks sharing a pipe never interleave."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def describe(exc: BaseException) -> str:
    """The error class, its code or kind and culprits, and its first line."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, AclnnError):
        tag = f" [{exc.code}]" if exc.kind.name in ("BAD_INPUT", "PEER_BAD_INPUT") else f" ({exc.kind.value})"
        first = first.split("] ", 1)[-1]                       # the code is in the tag
    elif isinstance(exc, EmuError):
        tag = f" ({exc.kind.value}, culprits {list(exc.culprits)})"
    else:
        tag = ""
    return f"{type(exc).__name__}{tag}: {first}"


def cause(exc: BaseException) -> str:
    """What to blame, the same sentence on every rank that blames the same thing."""
    if isinstance(exc, CollectiveError):
        return str(exc).splitlines()[0].rsplit("): ", 1)[-1].rstrip(".")
    if isinstance(exc, AclnnError) and exc.kind.name == "BAD_INPUT":
        return f"{type(exc).__name__} [{exc.code}] {exc.detail}"
    if isinstance(exc, EmuError) and exc.culprits:
        return f"{exc.kind.value}: ranks {list(exc.culprits)}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _report(exc: BaseException, show_traceback: bool) -> None:
    me = dist.get_rank() if dist.is_initialized() else 0
    _say(f"rank {me}: {describe(exc)}")
    if show_traceback:
        traceback.print_exception(exc, file=sys.stderr)
    if not dist.is_initialized():
        return
    try:
        store = c10d._get_default_store()
        n = store.add(_COUNT, 1)
        store.set(f"emu_fail/{n}", f"{me}\t{cause(exc)}")
        if n == 1:                                      # the first to fail sums up
            _summarise(store, dist.get_world_size())
            store.set(_DONE, "1")
        else:                                           # an exit now would get the summariser killed
            store.wait([_DONE], timedelta(seconds=10))
    except RuntimeError:
        pass


def _summarise(store, world: int, quiet_s: float = 1.0, most_s: float = 5.0) -> None:
    """Wait until no rank has reported for ``quiet_s`` (at most ``most_s``), then print the
    summary: how many ranks raised and each distinct cause with its ranks."""
    start = last_change = time.monotonic()
    seen = store.add(_COUNT, 0)
    while time.monotonic() - last_change < quiet_s and time.monotonic() - start < most_s:
        time.sleep(0.1)
        now = store.add(_COUNT, 0)
        if now != seen:
            seen, last_change = now, time.monotonic()
    by_cause: dict[str, list[int]] = {}
    for i in range(1, seen + 1):
        rank, text = store.get(f"emu_fail/{i}").decode().split("\t", 1)
        by_cause.setdefault(text, []).append(int(rank))
    parts = [f"{text} (rank{'s' if len(rs) > 1 else ''} {spans(sorted(rs))})" for text, rs in by_cause.items()]
    _say(f"FAIL: {seen} of {world} ranks raised: " + "; ".join(parts))


def run_reporting(main: Callable[[], int], show_traceback: bool = False) -> int:
    """``main()``'s exit status, or 1 after reporting its error in one line (see module doc)."""
    show_traceback = show_traceback or os.environ.get("EMU_TRACEBACK", "") not in ("", "0")
    try:
        return main()
    except Exception as exc:  # noqa: BLE001 - every error is reported, in one line
        _report(exc, show_traceback)
        return 1
