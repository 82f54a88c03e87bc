"""One strictness policy for the operators mc2-emu computes on the CPU (the routing and compute
operators of :mod:`emu.npu`): the device decides, the emulator mirrors it.

* Input the operator rejects (torch_npu's adapter, the aclnn checks, the tiling): raise what it
  raises, :class:`~emu.core.errors.AclnnError` with its aclnn code (:func:`reject`): 161001 a
  missing tensor, 161002 a parameter check, 561002 a tiling check.
* Input outside the documented contract that the kernel silently accepts (counts that do not add
  up, an argument it ignores, ...): do what the kernel does, and warn with
  :class:`~emu.core.errors.ContractWarning` once per call site (the first frame outside mc2-emu
  and torch, for each check) (:func:`tolerate`).  ``EMU_STRICT=1`` makes it raise
  ``AclnnError(161002)`` instead, for test suites that want out-of-contract input to fail.

The ordinary ``warnings`` filters apply to the warning (``-W error::...ContractWarning`` turns it
into an exception, ``ignore`` silences it).
"""
from __future__ import annotations

import os
import sys
import types
import warnings
from typing import NoReturn

import torch

from .errors import PARAM_INVALID, AclnnError, ContractWarning

STRICT_ENV = "EMU_STRICT"
_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
_WARNED: set[tuple[str, int, str, int]] = set()


def strict() -> bool:
    """Whether ``EMU_STRICT`` asks out-of-contract input to raise (any value but empty or 0)."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def fail(message: str, code: int = PARAM_INVALID) -> NoReturn:
    """Raise what the operator raises: ``AclnnError(code, message)``."""
    raise AclnnError(code, message)


def reject(ok: bool, message: str, code: int = PARAM_INVALID) -> None:
    """The operator's own check: unless ``ok``, raise ``AclnnError(code, message)``."""
    if not ok:
        raise AclnnError(code, message)


def _call_site() -> tuple[types.FrameType | None, int]:
    """The first frame outside mc2-emu and torch (the user's call) and its ``stacklevel`` for a
    ``warnings.warn`` in :func:`tolerate` (level 2: tolerate's caller, the check)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return frame, level


def tolerate(ok: bool, message: str) -> bool:
    """Input the kernel accepts although it is outside the operator's contract: unless ``ok``,
    warn (:class:`ContractWarning`, once per call site and check) or, under ``EMU_STRICT=1``,
    raise ``AclnnError(161002)``.  Returns True when the input is out of contract, so the caller
    goes on to do what the kernel does."""
    if ok:
        return False
    if strict():
        raise AclnnError(PARAM_INVALID, f"{message} ({STRICT_ENV}=1: out-of-contract input is an error)")
    check = sys._getframe(1)
    site, level = _call_site()
    key = (check.f_code.co_filename, check.f_lineno,
           site.f_code.co_filename if site is not None else "", site.f_lineno if site is not None else 0)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{message} (out of the operator's contract: mc2-emu does what the kernel does; "
                      f"{STRICT_ENV}=1 makes this an error)", ContractWarning, stacklevel=level)
    return True
