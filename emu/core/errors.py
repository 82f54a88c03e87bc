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
    PEER_FAILED = "a peer failed"                  # a peer raised on its own and never came
    DEAD_PEER = "dead peer"                        # a peer's process is gone without having raised
    TIMEOUT = "timeout"                            # a peer is alive but made no progress in time


class RankState(enum.Enum):
    """Where a member of a failed collective was, as the failing rank found out."""

    DEAD = "dead"              # its process is gone and it left no farewell: a cause
    STUCK = "stuck"            # alive, never arrived before the deadline: a cause
    FAILED = "failed"          # it raised (its farewell says what and why); a cause only if on its own
    BEHIND = "behind"          # alive, not arrived yet when the collective failed fast
    WAITING = "waiting"        # it arrived: it was in the collective too


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
    """A collective failed or timed out; names the rank, the group and the collective.

    kind: DEAD_PEER, TIMEOUT or PEER_FAILED; culprits: the ranks that caused it (dead, stuck,
    or failed on their own), the same on every live rank; states: what every other member
    of the group was doing (:class:`RankState`)."""

    def __init__(self, message: str, kind: ErrorKind, culprits: tuple[int, ...] = (),
                 states: dict[int, RankState] | None = None):
        super().__init__(message, kind, culprits)
        self.states = dict(states or {})


class ContractWarning(UserWarning):
    """An operator got input outside its documented contract that its kernel silently accepts
    (e.g. re_routing counts that do not sum to the token count): mc2-emu does what the kernel
    does and warns once per call site; ``EMU_STRICT=1`` makes it an :class:`AclnnError` (161002)
    instead (:mod:`emu.core.contract`)."""
