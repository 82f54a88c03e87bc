"""After the fact: where did the ranks of a group part ways?  Read from the watch records
(``watch-rank<r>.jsonl``, :mod:`emu.debug.watch`) of a trace directory.

For every group, the collectives of its members are lined up by sequence number; the first
number at which a member has no record (it never got there) or the members' fingerprints
differ is the group's first divergence.  The same op from different call sites is noted as
a hint (legitimate in rank-dependent code, suspicious around the MC2 calls).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from ..core.ranks import who
from .watch import Fingerprint


def load_watch(directory: str) -> dict[int, list[dict]]:
    """Every rank's watch records, in the order it issued them (``t1`` None: never completed)."""
    out: dict[int, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "watch-rank*.jsonl"))):
        index: dict[tuple[str, int], dict] = {}
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec.get("end"):
                    if (rec["group"], rec["seq"]) in index:
                        index[rec["group"], rec["seq"]]["t1"] = rec["t1"]
                    continue
                index[rec["group"], rec["seq"]] = rec
                out.setdefault(rec["rank"], []).append(rec)
    return out


def _fingerprint(rec: dict) -> Fingerprint:
    return Fingerprint(rec["op"], tuple(map(tuple, rec["shapes"])), tuple(rec["dtypes"]), rec["site"])


@dataclass(frozen=True)
class Divergence:
    """The first point where a group's members disagree: its group, members and sequence
    number, what each member called there (None: it never got there; then ``last`` is its last
    record anywhere), and the sentence saying so."""

    group: str
    ranks: tuple[int, ...]
    seq: int
    calls: dict[int, dict | None]
    last: dict[int, dict | None]
    text: str


def first_divergences(records: dict[int, list[dict]]) -> tuple[list[Divergence], list[str]]:
    """(the first divergence of every group where there is one, hints)."""
    groups: dict[str, tuple[int, ...]] = {}
    by_group: dict[tuple[str, int], dict[int, dict]] = {}
    for rank, recs in records.items():
        for rec in recs:
            groups[rec["group"]] = tuple(rec["group_ranks"])
            by_group.setdefault((rec["group"], rank), {})[rec["seq"]] = rec
    found, hints = [], []
    for group, ranks in sorted(groups.items()):
        seen = [by_group.get((group, r), {}) for r in ranks]
        top = max((max(s) for s in seen if s), default=0)
        for seq in range(1, top + 1):
            calls = {r: s.get(seq) for r, s in zip(ranks, seen)}
            missing = [r for r, c in calls.items() if c is None]
            keys: dict[tuple, list[int]] = {}
            for r, c in calls.items():
                if c is not None:
                    keys.setdefault(_fingerprint(c).key(), []).append(r)
            if missing or len(keys) > 1:
                last = {r: (records.get(r) or [None])[-1] for r in missing}
                found.append(_describe(group, ranks, seq, calls, keys, last))
                break
            sites = {c["site"] for c in calls.values()}
            if len(sites) > 1:
                hints.append(f"group {group} seq {seq}: {calls[ranks[0]]['op']} from different call sites: "
                             + "; ".join(f"{who([r for r, c in calls.items() if c['site'] == s])} at {s}"
                                         for s in sorted(sites)))
    return found, hints


def _describe(group: str, ranks: tuple[int, ...], seq: int, calls: dict, keys: dict, last: dict) -> Divergence:
    parts = [f"{who(rs)} called {_fingerprint(calls[rs[0]]).describe()}"
             for rs in sorted(keys.values(), key=lambda rs: (-len(rs), rs))]
    for r, rec in last.items():
        parts.append(f"rank {r} never got there (last: " + (
            f"{_fingerprint(rec).describe()}, group {rec['group']} seq {rec['seq']})" if rec else "nothing recorded)"))
    text = f"group {group} ({who(list(ranks))}), seq {seq}: " + "; ".join(parts)
    return Divergence(group, ranks, seq, calls, last, text)
