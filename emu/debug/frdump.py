"""The emulator's collective records as PyTorch flight-recorder dumps, for PyTorch's own analyzer.

:func:`write_dumps` writes one pickle per rank, ``DIR/<prefix><global rank>`` (e.g. ``DIR/rank0``),
laid out like the dumps of PyTorch's flight recorder (format version :data:`FR_VERSION`), so that

    torchfrtrace DIR -p rank        (or: python -m torch.distributed.flight_recorder.fr_trace DIR -p rank)

matches the ranks' collectives group by group and prints the first one where ranks disagree: a rank
missing from it ("Not all ranks joining collective ... missing ranks: {1}") or ranks that called a
different collective ("... has errors ... Culprit rank 1; Error type: COLLECTIVE_TYPE_MISMATCH, ...").
It prints nothing when every collective matched. Its culprits are the ranks that differ from the rank whose
dump it happens to list first (directory order), so a lone odd rank listed first makes it blame all the others.

Mapping: ``seq`` becomes the group's collective (and, for send / recv, p2p) sequence number; ops become
the analyzer's collective names, the emulator's ``dispatch`` / ``combine`` become ``all_to_all`` (named
``hccl:all_to_all dispatch``) with their output sizes set to the input sizes, since the analyzer checks
an all-to-all by comparing the ranks' total input and output element counts, which a MoE dispatch or
combine legitimately does not balance (the real output shapes are kept under ``emu_output_sizes``);
``t1 is None`` becomes state ``started`` (issued, never completed), else ``completed``; the call site
``file:line`` becomes the one stack frame. Use a directory of its own: the analyzer reads every file
whose name contains the prefix.
"""
from __future__ import annotations

import math
import os
import pickle
from typing import Any

FR_VERSION = "2.10"  # the dump layout of torch 2.13's flight recorder; the analyzer needs "major.minor"
_DESC = "undefined"  # no group description: the analyzer then shows the group's name alone

# emulator op -> the analyzer's collective name (components/types.py: COLLECTIVES and P2P)
_NAMES = {
    "all_reduce": "all_reduce", "all_gather": "all_gather", "all_gather_into_tensor": "_all_gather_base",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "_reduce_scatter_base",
    "broadcast": "broadcast", "barrier": "barrier", "all_to_all": "all_to_all", "all_to_all_single": "all_to_all",
    "send": "send", "isend": "send", "recv": "recv", "irecv": "recv", "dispatch": "all_to_all", "combine": "all_to_all",
}
_EMU_OPS = ("dispatch", "combine")


def _stacked(shapes: list[list[int]]) -> list[int]:
    """A list of tensors as the one flat buffer NCCL's recorder logs: [n, *shape] if all alike, else [numel]."""
    if all(s == shapes[0] for s in shapes):
        return [len(shapes), *shapes[0]]
    return [sum(math.prod(s) for s in shapes)]


def _sizes(op: str, name: str, rec: dict) -> tuple[list[list[int]], list[list[int]]]:
    """(input_sizes, output_sizes) as the analyzer checks them for collective ``name``."""
    ins = [list(s) for s in rec["shapes"]]
    outs = [list(s) for s in rec["out_shapes"]] or ins  # no outputs: in place
    if op in _EMU_OPS:
        outs = ins
    if name == "all_gather" and len(outs) > 1:
        outs = [_stacked(outs)]
    if name == "reduce_scatter" and len(ins) > 1:
        ins = [_stacked(ins)]
    if op == "all_to_all" and ins:  # lists: one buffer each, so the analyzer's total-numel check holds
        ins, outs = [_stacked(ins)], [_stacked(outs)]
    if name == "all_to_all" and not ins:
        ins = outs = [[0]]
    return ins, outs


def _frames(site: str | None, op: str) -> list[dict[str, Any]]:
    """The call site ``file:line`` as one frame {name, filename, line}; the op stands for the function."""
    if not site:
        return []
    filename, _, line = site.rpartition(":")
    if not filename or not line.isdigit():
        return [{"name": op, "filename": site, "line": 0}]
    return [{"name": op, "filename": filename, "line": int(line)}]


def _entry(index: int, rank: int, rec: dict, pg_id: int) -> dict[str, Any]:
    """Global rank ``rank``'s ``index``-th record as a flight-recorder entry (the keys of torch's
    ``FlightRecorder::getCollectiveTrace``)."""
    op, ranks, t0, t1 = rec["op"], list(rec["group_ranks"]), rec["t0"], rec["t1"]
    if op not in _NAMES:
        raise ValueError(f"unknown op {op!r} in a record of group {rec['group']!r}; known: {sorted(_NAMES)}")
    name = _NAMES[op]
    ins, outs = _sizes(op, name, rec)
    dtypes = list(rec["dtypes"])
    p2p = name in ("send", "recv")
    profiling = {"dispatch": "all_to_all dispatch", "combine": "all_to_all combine"}.get(op, name)
    if p2p:  # group ranks as the analyzer reads them: indices into the sorted member list
        me, peer = sorted(ranks).index(rank), sorted(ranks).index(rec["peer"])
        profiling = f"send {me}->{peer}" if name == "send" else f"recv {me}<-{peer}"
    entry = {
        "record_id": index, "pg_id": pg_id, "process_group": (rec["group"], _DESC),
        "thread_name": "emu", "thread_id": "0",
        "collective_seq_id": rec["seq"], "p2p_seq_id": rec["seq"] if p2p else 0, "op_id": rec["seq"],
        "profiling_name": f"hccl:{profiling}", "time_created_ns": t0,
        "input_sizes": ins, "input_dtypes": dtypes,
        "output_sizes": outs, "output_dtypes": dtypes if len(outs) == len(ins) else dtypes[:1] * len(outs),
        "state": "completed" if t1 is not None else "started",
        "time_discovered_started_ns": t0, "time_discovered_completed_ns": t1,
        "retired": t1 is not None, "timeout_ms": 0, "is_p2p": p2p, "frames": _frames(rec.get("site"), op),
    }
    if t1 is not None:
        entry["duration_ms"] = (t1 - t0) / 1e6
    if op in _EMU_OPS:
        entry["emu_output_sizes"] = [list(s) for s in rec["out_shapes"]]
    return entry


def _check_directory(directory: str, prefix: str, ranks: list[int]) -> None:
    """Refuse a prefix the loader cannot split and foreign or stale files the analyzer would read too."""
    if not prefix or os.sep in prefix or prefix[-1].isdigit():
        raise ValueError(f"file prefix {prefix!r}: must be non-empty, without {os.sep!r}, not ending in a digit")
    ours = {f"{prefix}{r}" for r in ranks}
    foreign = sorted(f for f in os.listdir(directory) if prefix in f and f not in ours)
    if foreign:
        raise ValueError(f"{directory} already holds {foreign}, which torchfrtrace -p {prefix} would read too; "
                         f"use an empty directory")


def write_dumps(directory: str, records: dict[int, list[dict]], prefix: str = "rank") -> list[str]:
    """Write one flight-recorder dump per rank, ``directory/<prefix><global rank>``; return their paths.

    records: global rank -> that rank's records in issue order, each a dict with keys group (str),
    group_ranks (global ranks in group-rank order), seq (1, 2, ... per group), op, shapes / out_shapes
    (lists of shapes), dtypes (torch names, one per input), site ("file:line"), t0 / t1 (CLOCK_MONOTONIC ns,
    t1 None if never completed) and peer (global rank, send / recv only).
    Each dump is a pickled dict {version, comm_lib_version, pg_config, pg_status, entries}; pg_config lists
    every group the rank belongs to (from all ranks' records), pg_status the group's last seq issued / started /
    completed (-1: none). Analyze with ``torchfrtrace <directory> -p <prefix>``.
    """
    # a group is its name and members: disjoint groups may share a name (as torch's split groups do)
    groups = sorted({(rec["group"], tuple(rec["group_ranks"])) for recs in records.values() for rec in recs})
    pg_ids = {g: i for i, g in enumerate(groups)}
    os.makedirs(directory, exist_ok=True)
    _check_directory(directory, prefix, list(records))
    paths = []
    for rank, recs in sorted(records.items()):
        mine = {name: ranks for name, ranks in groups if rank in ranks}
        for rec in recs:
            if mine.get(rec["group"]) != tuple(rec["group_ranks"]):
                raise ValueError(f"rank {rank}'s record seq {rec['seq']} of group {rec['group']!r} has members "
                                 f"{rec['group_ranks']}, the rank's group of that name {mine.get(rec['group'])}")
        config, status = {}, {}
        for name, ranks in mine.items():
            config[name] = {"name": name, "desc": _DESC, "ranks": str(list(ranks))}  # as torch's ranks_str
            seqs = [r["seq"] for r in recs if r["group"] == name]
            done = [r["seq"] for r in recs if r["group"] == name and r["t1"] is not None]
            last = max(seqs, default=-1)
            status[str(pg_ids[name, ranks])] = {"last_enqueued_collective": last, "last_started_collective": last,
                                                "last_completed_collective": max(done, default=-1)}
        dump = {
            "version": FR_VERSION, "comm_lib_version": "mc2-emu",
            "pg_config": config,
            "pg_status": status,
            "entries": [_entry(i, rank, rec, pg_ids[rec["group"], mine[rec["group"]]]) for i, rec in enumerate(recs)],
        }
        path = os.path.join(directory, f"{prefix}{rank}")
        with open(path, "wb") as f:
            pickle.dump(dump, f)
        paths.append(path)
    return paths
