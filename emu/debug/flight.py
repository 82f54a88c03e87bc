"""Flight recorder, farewells and blame, through the rendezvous store; fault injection.

Records, under the job's rendezvous store (each a few microseconds):

* ``emu_pid/<rank>`` = host:pid, once per process;
* ``emu_fr/<group>/<rank>`` and ``emu_last/<rank>``: the last collective it entered: the
  sequence number it reached in that group, the call and phase, and the process's collective
  count (published by a background thread at most ``PUBLISH_S`` after entering, so the op's
  path never waits for the store, and a job that runs well writes a batch per ``PUBLISH_S``
  at most, whatever its call rate; the rank publishes at once when one of its collectives
  waits longer than its first poll, before an injected fault, a diagnosis or a farewell, and
  at the first collective after a farewell);
* ``emu_bye/<rank>``: a *farewell* when an op raises: what it raised, blaming whom, at which
  collective count (stale once the rank issues another collective: that collective's record
  is written at once, so a peer never takes an old farewell for news);
* ``emu_stack/<rank>`` = host:pid:path of the file its Python stacks are written to when it
  receives SIGUSR2 (faulthandler), so a peer on the same host can ask where it is stuck.

When a collective fails, :meth:`FlightRecorder.diagnose` classifies every other member of the
group (:class:`~emu.core.errors.RankState`): a rank that raised is FAILED (never dead), a
rank whose process is gone without a farewell is DEAD, a live rank that never arrived is
STUCK after a timeout (its Python stack is fetched) or BEHIND after a fast failure; the
causes are named first, the same on every live rank.

``EMU_FAULT=rank:op:phase[:action]`` (e.g. ``3:dispatch:EP rows``) makes that global rank exit
with code 1 just before issuing that collective (``:hang``: sleep forever there;
``:delay=0.5``: wait that long first); several faults are separated by ``;``.  A fault
injection for tests and for users who want to see what their job does then.
"""
from __future__ import annotations

import atexit
import collections
import faulthandler
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import IO

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..core.env import getenv
from ..core.errors import ErrorKind, RankState
from ..core.ranks import spans, who

STACK_SIGNAL = signal.SIGUSR2
_HOST = socket.gethostname()


def _fault_specs() -> list[tuple[int, str, str, str]]:
    """EMU_FAULT: ``rank:op:phase[:action]`` entries separated by ";"; action exit (default),
    hang, or delay=SECONDS."""
    out = []
    for raw in os.environ.get("EMU_FAULT", "").split(";"):
        parts = raw.strip().split(":")
        if len(parts) >= 3 and parts[0].isdigit():
            out.append((int(parts[0]), parts[1], parts[2], parts[3] if len(parts) > 3 else "exit"))
    return out


def maybe_fail(op: str, phase: str, publish: Callable[[], None] | None = None) -> None:
    """Exit with code 1, hang, or wait here if EMU_FAULT names this rank, op and phase
    (``publish``: writes this rank's records first, as they stand when the fault strikes)."""
    if not getenv("EMU_FAULT", ""):
        return
    for rank, f_op, f_phase, action in _fault_specs():
        if rank != dist.get_rank() or f_op != op or f_phase != phase:
            continue
        if action.startswith("delay="):
            time.sleep(float(action.split("=", 1)[1]))
            continue
        if publish is not None:
            publish()
        if action == "hang":
            while True:
                time.sleep(3600)
        os._exit(1)


@dataclass(frozen=True)
class Failure:
    """A collective that failed on this rank: its group, the members' global ranks, its
    sequence number and label, how long it ran against its deadline, and gloo's words."""

    group: str
    ranks: tuple[int, ...]
    seq: int
    what: str
    elapsed_s: float
    limit_s: float
    cause: str

    @property
    def timed_out(self) -> bool:
        return self.elapsed_s >= 0.95 * self.limit_s or "timed out" in self.cause.lower()


@dataclass(frozen=True)
class Waiting:
    """The collective this rank entered last: its group, sequence number, and whether it is the
    first of the rank's current op call on that group."""

    group: str = ""
    seq: int = 0
    first: bool = True


@dataclass(frozen=True)
class Diagnosis:
    """Who caused a failure: every other member's state, the culprits (dead, stuck, or failed
    on their own), the error kind, and the explanation (first line, then one line per rank)."""

    states: dict[int, RankState]
    culprits: tuple[int, ...]
    kind: ErrorKind
    text: str


def _where(rec: dict | None) -> str:
    if not rec:
        return "no collective recorded"
    return f"{rec['op']} #{rec['call']} {rec['phase']} (group {rec['group']}, seq {rec['seq']})"


_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def innermost_user_frame(dump: str) -> str | None:
    """From a faulthandler dump: "in fn at file.py:12" for the main thread's innermost frame
    outside torch, mc2-emu and the standard library's threading / multiprocessing (naming the
    function it called into), else its innermost frame ("in fn at emu/x.py:3")."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip())
    main = next((b for b in reversed(blocks) if b.startswith("Current thread")), blocks[-1] if blocks else "")
    frames = _FRAME.findall(main)
    lib = (os.sep + "torch" + os.sep, os.sep + "emu" + os.sep, os.sep + "threading.py",
           os.sep + "multiprocessing" + os.sep, "<string>", "<frozen ")
    wrappers = ("wrapper", "inner", "_fn", "decorate_context", "watched")
    for i, (path, line, fn) in enumerate(frames):
        if not any(part in path for part in lib):
            called = [f for _, _, f in frames[:i] if f not in wrappers]     # innermost first
            return f"in {called[-1] if called else fn} at {os.path.basename(path)}:{line}"
    if frames:
        path, line, fn = frames[0]
        return f"in {fn} at {os.sep.join(path.split(os.sep)[-2:])}:{line}"
    return None


PUBLISH_S = 0.1                  # the publisher writes at most one batch per 100 ms
FAREWELLS = "emu_bye_count"      # farewells left in the job so far


class FlightRecorder:
    """This rank's records in the rendezvous store, its farewell, its stack file, and the
    reading of everyone's records when a collective fails."""

    def __init__(self, capacity: int = 64, store=None):
        self._pending: dict[str, dict] = {}               # store key -> latest record not yet written
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._publisher: threading.Thread | None = None
        self._stopping = False
        self._store = store                               # None: the default store, once there is one
        self.registered = False
        self.count = 0                                    # collectives of this process
        self.attempt = 0                                  # op calls of this process (recorded, for reports)
        self.ring: collections.deque[dict] = collections.deque(maxlen=capacity)
        self.stack_path: str | None = None
        self._farewells_seen = -1
        self._call_groups = set()                          # the groups of this rank's current op call
        self._keys: dict[str, tuple[str, str]] = {}         # group -> the store keys of this rank's records
        self.current = Waiting()
        self._consumed: dict[int, str | None] = {}        # rank -> the serial of its farewell this rank acted on
        self._stack_file: IO[str] | None = None
        self._said_farewell = False                       # a farewell is out; the next record retires it

    @property
    def store(self):
        """The job's rendezvous store itself, under the default group's key prefix (None before
        torch.distributed is initialised): a launcher holding that store reads the records too."""
        if self._store is None:
            try:
                store = c10d._get_default_store()
            except (RuntimeError, ValueError):
                return None
            while isinstance(store, dist.PrefixStore):
                store = store.underlying_store
            self._store = store
        return self._store

    def _set(self, key: str, value: str) -> None:
        try:
            self.store.set(key, value)
        except (RuntimeError, AttributeError):
            pass

    def _get(self, key: str) -> str | None:
        store = self.store
        try:
            return store.get(key).decode() if store is not None and store.check([key]) else None
        except RuntimeError:
            return None

    def register(self) -> None:
        """Once per process (after torch.distributed is up): pid record, stack file, SIGUSR2."""
        if self.registered or self.store is None:
            return
        self.registered = True
        me = dist.get_rank()
        self._set(f"emu_pid/{me}", f"{_HOST}:{os.getpid()}")
        directory = os.environ.get("EMU_TRACE") or os.path.join(tempfile.gettempdir(), "mc2-emu-stacks")
        try:
            os.makedirs(directory, exist_ok=True)
            self.stack_path = os.path.join(directory, f"rank{me}-{os.getpid()}.stack")
            self._stack_file = open(self.stack_path, "w", buffering=1)
            faulthandler.register(STACK_SIGNAL, file=self._stack_file, all_threads=True, chain=False)
            atexit.register(self._drop_empty_stack_file)
            self._set(f"emu_stack/{me}", f"{_HOST}:{os.getpid()}:{self.stack_path}")
        except (OSError, RuntimeError, ValueError):
            self.stack_path = None

    def _drop_empty_stack_file(self) -> None:
        if self.stack_path and os.path.exists(self.stack_path) and os.path.getsize(self.stack_path) == 0:
            os.unlink(self.stack_path)

    def begin_op(self) -> None:
        """An op call starts (its number in this process, for the records)."""
        self.attempt += 1
        self._call_groups: set[str] = set()

    def entered(self, group: str, seq: int, op: str, call: int, phase: str) -> None:
        """Record that this rank is about to issue collective ``seq`` of ``group``."""
        self.register()
        self.count += 1
        self.current = Waiting(group, seq, group not in self._call_groups)
        self._call_groups.add(group)
        rec = {"group": group, "seq": seq, "op": op, "call": call, "phase": phase, "n": self.count,
               "attempt": self.attempt, "t": time.time()}
        self.ring.append(rec)
        if self.store is not None:
            keys = self._keys.get(group)
            if keys is None:                    # the store keys of this rank's records on ``group``
                me = dist.get_rank()
                keys = self._keys[group] = (f"emu_fr/{group}/{me}", f"emu_last/{me}")
            with self._lock:
                self._pending[keys[0]] = rec
                self._pending[keys[1]] = rec
            if self._publisher is None:
                self._start_publisher()
            if self._said_farewell:             # the store must show at once that the farewell is old
                self._said_farewell = False
                self.flush()

    def flush(self) -> None:
        """Write the records not yet in the store (the publisher's work, done now)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        for key, rec in batch.items():
            self._set(key, json.dumps(rec))

    def _start_publisher(self) -> None:
        self._publisher = threading.Thread(target=self._publish, name="mc2-emu flight recorder", daemon=True)
        self._publisher.start()
        atexit.register(self._stop_publisher)

    def _publish(self) -> None:
        while not self._stopping:
            self._wake.wait(PUBLISH_S)
            if not self._stopping:
                self.flush()

    def _stop_publisher(self) -> None:
        """At exit, before the interpreter tears threads down: no store call may be in flight."""
        self._stopping = True
        self._wake.set()
        if self._publisher is not None:
            self._publisher.join(timeout=2)
            self.flush()                        # what this rank did last, for peers that outlive it

    def farewell(self, type_name: str, kind: ErrorKind | None, culprits: tuple[int, ...], message: str,
                 code: int | None = None) -> None:
        """Record, before the error leaves the op, that this rank raised it, with which operator
        error ``code`` (if any) and blaming whom; then count it (peers waiting in a collective
        read farewells only when the count moved)."""
        self.flush()
        last = self.ring[-1] if self.ring else None
        self._set(f"emu_bye/{dist.get_rank()}", json.dumps({
            "type": type_name, "kind": kind.name if kind is not None else None, "culprits": list(culprits),
            "code": code, "message": message.splitlines()[0][:400] if message else "", "n": self.count,
            "attempt": self.attempt, "at": _where(last), "serial": f"{os.getpid()}:{time.monotonic_ns()}",
            "groups": sorted(self._call_groups)}))
        self._said_farewell = True
        try:
            self.store.add(FAREWELLS, 1)                  # after the record: a reader that sees the count sees it
        except (RuntimeError, AttributeError):
            pass

    def departures(self, ranks: list[int]) -> dict[int, dict]:
        """The farewells ``ranks`` left in this rank's current op call (one store read while
        none was added since the last look)."""
        try:
            count = self.store.add(FAREWELLS, 0)
        except (RuntimeError, AttributeError):
            return {}
        if count == self._farewells_seen:
            return {}
        found = {r: bye for r in ranks
                 if r != dist.get_rank() and (bye := self.farewell_of(r, self.current)) is not None}
        if not found:
            self._farewells_seen = count
        self.consume(found)
        return found

    def consume(self, farewells: dict[int, dict]) -> None:
        """This rank acted on these farewells (raised because of them): they are not news again."""
        for r, bye in farewells.items():
            self._consumed[r] = bye.get("serial")

    def alive(self, rank: int) -> bool | None:
        """True/False when ``rank`` runs on this host and its pid can be checked, else None."""
        rec = self._get(f"emu_pid/{rank}")
        if rec is None:
            return None
        host, pid = rec.rsplit(":", 1)
        if host != _HOST:
            return None
        try:
            with open(f"/proc/{int(pid)}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def farewell_of(self, rank: int, at: "Waiting | None" = None) -> dict | None:
        """The farewell ``rank`` left, if it issued no collective since and this rank has not
        acted on it yet; with ``at`` (where this rank waits), only if it tells why ``rank`` is not
        there: ``rank`` is one collective behind on that group, and raised in an op call that
        never came to it (this rank waits in its call's first collective there) or that did (a
        later one).  A farewell ``rank`` left in an earlier call, after a verdict every rank heard,
        names the group it was in: it is no news in the next call.  (Ranks that skip calls, such
        as removed ranks under elastic scaling, count op calls differently: call counts cannot
        tell an old farewell.)"""
        raw = self._get(f"emu_bye/{rank}")
        if raw is None:
            return None
        bye = json.loads(raw)
        if bye.get("serial") is not None and self._consumed.get(rank) == bye.get("serial"):
            return None
        if at is not None:
            rec = self.reached(at.group, rank)
            if (rec["seq"] if rec else 0) != at.seq - 1 or (at.group in bye.get("groups", ())) == at.first:
                return None
        last = self._get(f"emu_last/{rank}")
        return bye if last is None or bye["n"] >= json.loads(last)["n"] else None

    def reached(self, group: str, rank: int) -> dict | None:
        raw = self._get(f"emu_fr/{group}/{rank}")
        return json.loads(raw) if raw else None

    def last_record(self, rank: int) -> dict | None:
        raw = self._get(f"emu_last/{rank}")
        return json.loads(raw) if raw else None

    def _state(self, r: int, failure: Failure) -> tuple[RankState, dict | None]:
        alive = self.alive(r)                    # before the farewell: a farewell precedes any exit
        bye = self.farewell_of(r, self.current if self.current.group == failure.group else None)
        if bye is not None:
            return RankState.FAILED, bye
        if alive is False:
            return RankState.DEAD, None
        rec = self.reached(failure.group, r)
        if rec is not None and rec["seq"] >= failure.seq:
            return RankState.WAITING, None
        return (RankState.STUCK if failure.timed_out else RankState.BEHIND), None

    def diagnose(self, failure: Failure, grace_s: float = 1.0) -> Diagnosis:
        """Classify every other member of the failed collective, waiting up to ``grace_s`` for
        ranks that have not arrived to be seen dead or to leave a farewell."""
        me = dist.get_rank()
        self.flush()
        others = [r for r in failure.ranks if r != me]
        deadline = time.monotonic() + grace_s
        while True:
            seen = {r: self._state(r, failure) for r in others}
            if all(s != RankState.BEHIND for s, _ in seen.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        states = {r: s for r, (s, _) in seen.items()}
        self.consume({r: bye for r, (s, bye) in seen.items() if s == RankState.FAILED})
        own_fault = [r for r, (s, bye) in seen.items()
                     if s == RankState.FAILED and (bye["kind"] == ErrorKind.BAD_INPUT.name or r in bye["culprits"])]
        dead = [r for r, s in states.items() if s == RankState.DEAD]
        stuck = [r for r, s in states.items() if s == RankState.STUCK]
        culprits = tuple(sorted(dead + stuck + own_fault)) or tuple(sorted(
            r for r, s in states.items() if s == RankState.BEHIND))
        kind = ErrorKind.DEAD_PEER if dead else ErrorKind.TIMEOUT if stuck or not own_fault else ErrorKind.PEER_FAILED
        stacks = {r: innermost_user_frame(d) or "in mc2-emu or torch" for r, d in self.fetch_stacks(stuck).items()}
        if failure.timed_out:
            self.dump_own()
        return Diagnosis(states=states, culprits=culprits, kind=kind,
                         text=self._explain(failure, seen, culprits, stacks))

    def _explain(self, failure: Failure, seen: dict, culprits: tuple[int, ...], stacks: dict[int, str]) -> str:
        me = dist.get_rank()
        how = (f"no progress for {failure.limit_s:g} s (EMU_TIMEOUT_S)" if failure.timed_out
               else f"failed after {failure.elapsed_s:.2f} s ({failure.cause})")
        causes = []
        for r in culprits:
            state, bye = seen[r]
            causes.append(f"rank {r} is {state.value}" + (f" ({bye['type']}: {bye['message']})"
                                                             if state == RankState.FAILED else ""))
        lines = [f"{failure.what} (seq {failure.seq}) on group {failure.group} (ranks {spans(sorted(failure.ranks))}): "
                 f"{how}"
                 + (": " + "; ".join(causes) if causes else "") + "."]
        for r in culprits:
            state, bye = seen[r]
            if state == RankState.DEAD:
                lines.append(f"  rank {r}: dead, its process is gone (last: {_where(self.last_record(r))})")
            elif state == RankState.STUCK:
                where = stacks.get(r) or "no stack (not on this host, or never used mc2-emu)"
                lines.append(f"  rank {r}: stuck {where} (last: {_where(self.last_record(r))})")
            elif state == RankState.FAILED:
                lines.append(f"  rank {r}: failed on its own in {bye['at']}: {bye['type']}: {bye['message']}")
            else:
                lines.append(f"  rank {r}: not arrived (last: {_where(self.last_record(r))})")
        after: dict[tuple[int, ...], list[int]] = {}
        for r, (state, bye) in seen.items():
            if state == RankState.FAILED and r not in culprits:
                after.setdefault(tuple(bye["culprits"]), []).append(r)
        for blamed, rs in sorted(after.items()):
            lines.append(f"  {who(rs)}: failed after {who(list(blamed)) if blamed else 'a peer'}")
        waiting = [r for r, (s, _) in seen.items() if s == RankState.WAITING] + [me]
        behind = [r for r, (s, _) in seen.items() if s == RankState.BEHIND and r not in culprits]
        lines.append(f"  {who(sorted(waiting))}: in {failure.what} (seq {failure.seq})")
        if behind:
            lines.append(f"  {who(behind)}: alive, not arrived yet")
        if stacks or failure.timed_out:
            lines.append(f"  Python stacks: {os.path.dirname(self.stack_path or '') or '(none)'}/rank*.stack")
        return "\n".join(lines)

    def fetch_stacks(self, ranks: list[int], wait_s: float = 1.0) -> dict[int, str]:
        """Ask each rank (on this host) to dump its Python stacks (SIGUSR2); their dumps."""
        pending = {}
        for r in ranks:
            rec = self._get(f"emu_stack/{r}")
            if rec is None:
                continue
            host, pid, path = rec.split(":", 2)
            if host != _HOST or not os.path.exists(path):
                continue
            try:
                size = os.path.getsize(path)
                os.kill(int(pid), STACK_SIGNAL)
            except OSError:
                continue
            pending[r] = (path, size)
        out: dict[int, str] = {}
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
            for r, (path, size) in list(pending.items()):
                if os.path.getsize(path) > size:
                    time.sleep(0.05)                                  # let the dump finish
                    with open(path) as f:
                        f.seek(size)
                        out[r] = f.read()
                    del pending[r]
        return out

    def dump_own(self) -> None:
        """Write this rank's Python stacks and its last collectives next to its stack file."""
        if self._stack_file is None:
            return
        faulthandler.dump_traceback(file=self._stack_file, all_threads=True)
        with open(self.stack_path.replace(".stack", ".flight.json"), "w") as f:
            json.dump(list(self.ring), f, indent=1)

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
