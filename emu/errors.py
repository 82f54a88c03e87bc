"""The operator's error classes.

The real aclnn entry points return integer status codes; torch_npu turns them into a
RuntimeError.  mc2-emu raises :class:`AclnnError`, a RuntimeError subclass carrying the
same code, so callers that catch RuntimeError keep working and tests can check the class.
"""
from __future__ import annotations

PARAM_NULLPTR = 161001      # ACLNN_ERR_PARAM_NULLPTR: a required tensor / group is missing
PARAM_INVALID = 161002      # ACLNN_ERR_PARAM_INVALID: dtype/format not among compiled variants
TILING_ERROR = 561002       # ACLNN_ERR_INNER_TILING_ERROR: attribute / shape / window rules

_CODE_NAMES = {
    PARAM_NULLPTR: "ACLNN_ERR_PARAM_NULLPTR",
    PARAM_INVALID: "ACLNN_ERR_PARAM_INVALID",
    TILING_ERROR: "ACLNN_ERR_INNER_TILING_ERROR",
}


class AclnnError(RuntimeError):
    """An error the real operator would report, with its aclnn status ``code``."""

    def __init__(self, code: int, message: str):
        self.code = int(code)
        self.detail = message
        super().__init__(f"[{self.code} {_CODE_NAMES.get(self.code, '?')}] {message}")


class PeerError(AclnnError):
    """Raised on a rank whose peer reported an error or disagreed in the same call.

    ``origins``: global ranks whose own input was rejected (empty for disagreements).
    """

    def __init__(self, code: int, message: str, origins: list[int] | None = None):
        super().__init__(code, message)
        self.origins = list(origins or [])


def nullptr(param: str, op: str) -> AclnnError:
    return AclnnError(PARAM_NULLPTR, f"{op}: {param} must not be null")


def invalid(param: str, value, rule: str, op: str) -> AclnnError:
    return AclnnError(PARAM_INVALID, f"{op}: {param}={value!r} is invalid: {rule}")


def tiling(param: str, value, rule: str, op: str) -> AclnnError:
    return AclnnError(TILING_ERROR, f"{op}: {param}={value!r} is invalid: {rule}")
