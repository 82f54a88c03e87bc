"""The verdict of a header exchange: the same on every rank, since each sees every header.

A peer's error, a mismatched call, or a mismatched attribute becomes a typed
:class:`~emu.core.errors.PeerError` naming the ranks; otherwise the call goes on.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core.errors import TILING_ERROR, ErrorKind, PeerError
from ..core.ranks import who
from .domain import Domain
from .header import Header


def _minority(groups: list[list[int]]) -> tuple[int, ...]:
    """The ranks outside the largest group (all ranks when there is a tie)."""
    biggest = max(len(g) for g in groups)
    if sum(len(g) == biggest for g in groups) > 1:
        return tuple(sorted(r for g in groups for r in g))
    return tuple(sorted(r for g in groups if len(g) < biggest for r in g))


def _sites(ranks: list[int], site_of: Callable[[int], str | None]) -> str:
    """"; called at client.py:30 (ranks 0-2), client.py:34 (rank 3)" when the watch knows them."""
    by_site: dict[str, list[int]] = {}
    for r in ranks:
        site = site_of(r)
        if site:
            by_site.setdefault(site, []).append(r)
    return ("; called at " + ", ".join(f"{s} ({who(rs)})" for s, rs in by_site.items())) if by_site else ""


#: Verdicts a rank relays to the domains it has not yet told (header ``kind``: the index here;
#: 0 is an input a rank rejected, whose origin the header names).
RELAYED = (ErrorKind.BAD_INPUT, ErrorKind.MISMATCHED_ATTRIBUTE, ErrorKind.MISMATCHED_CALL,
           ErrorKind.MISMATCHED_DATA)


def relay_kind(err: Exception) -> int:
    """The header ``kind`` that relays ``err`` (0 for a rejected input, this rank's or a peer's)."""
    kind = getattr(err, "kind", None)
    return RELAYED.index(kind) if kind in RELAYED[1:] else 0


def judge(hdr: Header, dom: Domain, me: int, call: tuple[str, int, int], attrs: tuple[tuple[str, int], ...],
          message_of: Callable[[int, int], str | None],
          site_of: Callable[[int], str | None] = lambda r: None,
          verdict_of: Callable[[int, int], dict | None] = lambda r, order: None) -> PeerError | None:
    """A peer's error, a call mismatch or an attribute mismatch on ``dom``, else None.

    me: this global rank; call: (op, its call number, the call's place among the group's op
    calls) of this rank; attrs: its agreed attributes; message_of(origin, place): the message a
    rank that rejected its input left behind; site_of(rank): the rank's call site, when the watch
    records it; verdict_of(rank, place): the verdict a rank relays (kind, culprits, text).
    """
    ranks = dom.ranks
    op, call_no, _order = call
    bad = np.flatnonzero(~hdr.genuine)
    if bad.size:
        culprits = [ranks[i] for i in bad]
        return PeerError(TILING_ERROR, f"rank {me}: {who(culprits)} sent data that is not an mc2-emu header on "
                         f"{dom.describe()} (a collective outside the op?)", kind=ErrorKind.MISMATCHED_DATA,
                         culprits=tuple(culprits))
    err = np.flatnonzero(hdr.error != 0)
    relayed = [i for i in err if 0 < hdr.kind[i] < len(RELAYED)]
    if relayed and len(relayed) == err.size:                 # only verdicts a peer relays from its own group
        i = relayed[0]
        v = verdict_of(ranks[i], int(hdr.order[i])) or {}
        return PeerError(int(hdr.error[i]), f"rank {me}: {op} call #{call_no} aborted: rank {ranks[i]} relays "
                         f"on {dom.describe()}: {v.get('text', RELAYED[hdr.kind[i]].value)}",
                         kind=RELAYED[hdr.kind[i]], culprits=tuple(v.get("culprits") or (ranks[i],)))
    if err.size:
        err = np.array([i for i in err if hdr.kind[i] == 0 or hdr.kind[i] >= len(RELAYED)])
        origins = sorted({int(hdr.origin[i]) for i in err})
        via = sorted({ranks[i] for i in err} - set(origins))
        details = []
        for o in origins:
            text = message_of(o, int(hdr.order[err[0]]))
            details.append(f"rank {o}: {text}" if text else f"rank {o}: error {int(hdr.error[err[0]])}")
        return PeerError(int(hdr.error[err[0]]),
                         f"rank {me}: {op} call #{call_no} aborted because {who(origins)} rejected its input"
                         + (f" (reported through {who(via)})" if via else "")
                         + f" on {dom.describe()}: " + " | ".join(details), origins=origins)
    same_call = bool((hdr.op == hdr.op[0]).all() and (hdr.order == hdr.order[0]).all())
    values = np.array([v for _, v in attrs], dtype=np.int64)
    if same_call and bool((hdr.attrs[:, :values.size] == values).all()):
        return None                                   # the common case, without a loop over ranks
    calls: dict[tuple[str, int], list[int]] = {}
    numbers: dict[tuple[str, int], int] = {}
    for i in range(dom.size):
        key = (hdr.op_name(i), int(hdr.order[i]))
        calls.setdefault(key, []).append(ranks[i])
        numbers[key] = int(hdr.call_no[i])
    if len(calls) > 1:
        groups = sorted(calls.items(), key=lambda kv: len(kv[1]))
        desc = " while ".join(f"{who(sorted(rs))} called {o} #{numbers[o, order]}" for (o, order), rs in groups)
        return PeerError(TILING_ERROR, f"rank {me}: mismatched calls on {dom.describe()}: {desc}"
                         + _sites(ranks, site_of), kind=ErrorKind.MISMATCHED_CALL,
                         culprits=_minority([rs for _, rs in groups]))
    for idx, (name, value) in enumerate(attrs):
        col = hdr.attrs[:, idx]
        if (col != value).any():
            by_value: dict[int, list[int]] = {}
            for i in range(dom.size):
                by_value.setdefault(int(col[i]), []).append(ranks[i])
            desc = " while ".join(f"{who(sorted(rs))} passed {v}"
                                  for v, rs in sorted(by_value.items(), key=lambda kv: len(kv[1])))
            return PeerError(TILING_ERROR, f"rank {me}: attribute {name} differs between the ranks of "
                             f"{op} call #{call_no} on {dom.describe()}: {desc}" + _sites(ranks, site_of),
                             kind=ErrorKind.MISMATCHED_ATTRIBUTE, culprits=_minority(list(by_value.values())))
    return None
