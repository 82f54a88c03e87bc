"""Flight recorder and dead-peer diagnosis through the rendezvous store, and fault injection.

Before every header exchange (the first collective of each group in a call; the rows
exchange follows at the next sequence number) a rank writes, under
``emu_fr/<group>/<global rank>``, the sequence number it reached in that group with the call
and phase; once per process it writes its host and pid under ``emu_pid/<global rank>``.
When a collective fails or times out, the live ranks read those keys to say which peers
never reached the collective, which of them are dead (same host: their pid is gone or a
zombie) and what each member reached.

``EMU_FAULT=rank:op:phase`` (e.g. ``3:dispatch:EP rows``) makes that global rank exit with
code 1 just before issuing that collective: a fault injection for tests and for users who
want to see what their job does when a rank dies.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def _fault_spec() -> tuple[int, str, str] | None:
    raw = os.environ.get("EMU_FAULT")
    if not raw:
        return None
    parts = raw.split(":", 2)
    return (int(parts[0]), parts[1], parts[2]) if len(parts) == 3 and parts[0].isdigit() else None


def maybe_fail(op: str, phase: str) -> None:
    """Exit with code 1 here if EMU_FAULT names this rank, op and phase."""
    fault = _fault_spec()
    if fault is not None and fault[0] == dist.get_rank() and fault[1] == op and fault[2] == phase:
        os._exit(1)


@dataclass(frozen=True)
class Diagnosis:
    """Why a collective failed, as far as the store tells: ``dead`` ranks (their process is
    gone), ``behind`` ranks (never recorded reaching it), and the sentence saying so."""

    dead: tuple[int, ...]
    behind: tuple[int, ...]
    text: str


class FlightRecorder:
    """Records this rank's progress in the rendezvous store and reads the others'."""

    def __init__(self):
        self._store = None
        self._pid_written = False

    @property
    def store(self):
        """The default rendezvous store (None before torch.distributed is initialised)."""
        if self._store is None:
            try:
                self._store = c10d._get_default_store()
            except (RuntimeError, ValueError):
                pass
        return self._store

    def entered(self, group: str, seq: int, op: str, call: int, phase: str) -> None:
        """Record that this rank is about to issue collective ``seq`` of ``group``."""
        store = self.store
        if store is None:
            return
        me = dist.get_rank()
        if not self._pid_written:
            store.set(f"emu_pid/{me}", f"{socket.gethostname()}:{os.getpid()}")
            self._pid_written = True
        store.set(f"emu_fr/{group}/{me}", json.dumps({"seq": seq, "op": op, "call": call, "phase": phase}))

    def alive(self, rank: int) -> bool | None:
        """True/False when ``rank`` runs on this host and its pid can be checked, else None."""
        store = self.store
        key = f"emu_pid/{rank}"
        try:
            if store is None or not store.check([key]):
                return None
            host, pid = store.get(key).decode().rsplit(":", 1)
        except RuntimeError:
            return None
        if host != socket.gethostname():
            return None
        try:
            with open(f"/proc/{int(pid)}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def reached(self, group: str, ranks: list[int]) -> dict[int, dict | None]:
        """What each global rank of ``group`` last recorded (None: nothing yet)."""
        store = self.store
        out: dict[int, dict | None] = {}
        for r in ranks:
            key = f"emu_fr/{group}/{r}"
            try:
                out[r] = json.loads(store.get(key)) if store is not None and store.check([key]) else None
            except RuntimeError:
                out[r] = None
        return out

    def diagnose(self, group: str, ranks: list[int], seq: int, what: str) -> Diagnosis:
        """Which peers never finished ``what`` (collective ``seq`` of ``group``), and why."""
        me = dist.get_rank()
        state = self.reached(group, ranks)
        dead = [r for r in ranks if r != me and self.alive(r) is False]
        behind = [r for r in ranks if r != me and (state[r] is None or state[r]["seq"] < seq)]
        parts = []
        if dead:
            parts.append("dead: " + ", ".join(f"rank {r}" + (f" (last in {state[r]['op']} #{state[r]['call']} "
                                                                 f"{state[r]['phase']}, seq {state[r]['seq']})"
                                                                 if state[r] else "") for r in dead)
                         + f"; it never finished {what} (seq {seq})" + ";")
        if behind:
            parts.append("never reached it: " + ", ".join(f"rank {r}" for r in behind))
        table = "; ".join(f"rank {r}: " + (f"seq {s['seq']} ({s['op']} #{s['call']} {s['phase']})" if s else "none")
                          for r, s in state.items())
        text = (" ".join(parts) + ". " if parts else "") + f"Flight recorder for {group}: {table}"
        return Diagnosis(dead=tuple(dead), behind=tuple(behind), text=text)

    def message(self, key: str, message: str | None = None, wait_s: float = 0.0) -> str | None:
        """Set (message given) or read a short text under ``key`` in the rendezvous store."""
        store = self.store
        if store is None:
            return None
        try:
            if message is not None:
                store.set(key, message)
                return message
            if wait_s:
                store.wait([key], timedelta(seconds=wait_s))
            return store.get(key).decode() if store.check([key]) else None
        except RuntimeError:
            return None
