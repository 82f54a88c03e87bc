"""The operator's error classes, and the emulator's typed diagnoses.

The real aclnn entry points return integer status codes; torch_npu turns them into a
RuntimeError.  mc2-emu raises :class:`AclnnError`, a RuntimeError subclass carrying the
same code, so callers that catch RuntimeError keep working.  Every error of the emulator
also says *what kind* of failure it is (:class:`ErrorKind`) and which ranks caused it
(``culprits``, global ranks), so tests and tools assert kinds, not message text.
"""
from __future__ import annotations

import enum

PARAM_NULLPTR = 161001      # ACLNN_ERR_PARAM_NULLPTR: a required tensor / group is missing
PARAM_INVALID = 161002      # ACLNN_ERR_PARAM_INVALID: dtype/format not among compiled variants
TILING_ERROR = 561002       # ACLNN_ERR_INNER_TILING_ERROR: attribute / shape / window rules

_CODE_NAMES = {
    PARAM_NULLPTR: "ACLNN_ERR_PARAM_NULLPTR",
    PARAM_INVALID: "ACLNN_ERR_PARAM_INVALID",
    TILING_ERROR: "ACLNN_ERR_INNER_TILING_ERROR",
}


class ErrorKind(enum.Enum):
    """What went wrong, independent of the message text."""

    BAD_INPUT = "bad input"                        # this rank's own input failed a check
    PEER_BAD_INPUT = "bad input on a peer"         # a peer's input failed; it told every rank
    MISMATCHED_CALL = "mismatched call"            # ranks are in different calls (op or call number)
    MISMATCHED_ATTRIBUTE = "mismatched attribute"  # ranks passed different values of an agreed attribute
    MISMATCHED_DATA = "mismatched data"            # inputs not from the dispatch they claim, foreign data
    DEAD_PEER = "dead peer"                        # a peer's process is gone
    TIMEOUT = "timeout"                            # a collective failed or made no progress in time


class EmuError(RuntimeError):
    """Base of every error mc2-emu raises: ``kind`` and ``culprits`` (global ranks)."""

    def __init__(self, message: str, kind: ErrorKind, culprits: tuple[int, ...] = ()):
        super().__init__(message)
        self.kind = kind
        self.culprits = tuple(int(r) for r in culprits)


class AclnnError(EmuError):
    """An error the real operator would report, with its aclnn status ``code``."""

    def __init__(self, code: int, message: str, kind: ErrorKind = ErrorKind.BAD_INPUT,
                 culprits: tuple[int, ...] = ()):
        self.code = int(code)
        self.detail = message
        super().__init__(f"[{self.code} {_CODE_NAMES.get(self.code, '?')}] {message}", kind, culprits)


class PeerError(AclnnError):
    """Raised on a rank whose peer reported an error or disagreed in the same call.

    ``origins``: global ranks whose own input was rejected (empty for disagreements);
    ``culprits``: the ranks the verdict blames (the origins, or the odd ones out).
    """

    def __init__(self, code: int, message: str, kind: ErrorKind = ErrorKind.PEER_BAD_INPUT,
                 origins: list[int] | None = None, culprits: tuple[int, ...] | None = None):
        self.origins = list(origins or [])
        super().__init__(code, message, kind, tuple(self.origins) if culprits is None else culprits)


class CollectiveError(EmuError):
    """A collective failed or timed out (``kind`` DEAD_PEER or TIMEOUT); names the rank, the
    group and the collective; ``culprits``: the ranks that are dead or never arrived."""

