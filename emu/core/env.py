"""Reading the environment on the hot path.

An op call reads a dozen settings (``EMU_TRANSPORT``, ``EMU_TIMEOUT_S``, ``EMU_FAULT``, the
variables its checks depend on); ``os.environ`` encodes every name and decodes every value it
looks up.  These read the environment's own mapping instead, and give the same answers
(``os.environ`` stays the one place the environment is changed).
"""
from __future__ import annotations

import os

_ENCODED: dict[tuple[str, ...], tuple] = {}
_NAMES: dict[str, bytes] = {}
_RAW = getattr(os.environ, "_data", None) if type(os.environ).__name__ == "_Environ" else None


def env_values(names: tuple[str, ...]) -> tuple:
    """The raw values of the environment variables ``names`` (None where unset), to compare
    with an earlier call's."""
    if _RAW is None:
        return tuple(os.environ.get(n) for n in names)
    keys = _ENCODED.get(names)
    if keys is None:
        keys = _ENCODED[names] = tuple(os.environ.encodekey(n) for n in names)
    return tuple([_RAW.get(k) for k in keys])


def getenv(name: str, default: str) -> str:
    """``os.environ.get(name, default)``."""
    if _RAW is None:
        return os.environ.get(name, default)
    key = _NAMES.get(name)
    if key is None:
        key = _NAMES[name] = os.environ.encodekey(name)
    raw = _RAW.get(key)
    return default if raw is None else os.environ.decodevalue(raw)
