"""Watch every collective of the job: torch.distributed's and the emulator's ops, one sequence
per process group, so ordering bugs around the MC2 calls show where ranks part ways.

``EMU_WATCH=1`` (record) or ``EMU_WATCH=strict`` (check), or ``emu.watch(strict=...)``, wraps
torch.distributed's collectives (``all_reduce``, ``all_gather(_into_tensor)``,
``reduce_scatter(_tensor)``, ``broadcast``, ``barrier``, ``all_to_all(_single)``, ``send`` /
``recv`` / ``isend`` / ``irecv``) and notes the emulator's ``dispatch`` / ``combine`` on their EP
group.  Each collective gets a :class:`Fingerprint` (op, input shapes and dtypes, the caller's
``file:line``) and the group's next sequence number.

* record: the fingerprint goes to the rank's ring, to ``watch-rank<r>.jsonl`` in the trace
  directory when tracing is on (``EMU_TRACE``: a line when issued, an ``end`` line when it
  completes), and to ``emu_watch_last/<rank>`` in the rendezvous store (so a stuck rank's
  peers can say where it is);
* strict (like ``TORCH_DISTRIBUTED_DEBUG=DETAIL``): before the collective every member puts its
  fingerprint in the store and reads the others'; at the first divergence every rank raises
  :class:`WatchDivergence` naming it: ``group 0 (ranks 0-3), seq 5: ranks 0, 2-3 called dispatch
  at moe.py:88; rank 1 called all_reduce([8, 7168] bfloat16) at model.py:41``.

``EMU_JITTER_MS=N`` (seed ``EMU_JITTER_SEED``) delays each rank a random 0..N ms before each
collective, so bugs that depend on arrival order show up; the delays are recorded.
p2p ops are recorded on a channel per (source, destination) pair.
"""
from __future__ import annotations

import collections
import json
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO

import torch
import torch.distributed as dist

from ..core.errors import CollectiveError, ErrorKind, PeerError, TILING_ERROR
from ..core.ranks import who
from .flight import FlightRecorder

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
           "broadcast", "barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")
P2P = {"send": "dst", "isend": "dst", "recv": "src", "irecv": "src"}
SAME_SHAPES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "send", "recv", "isend", "irecv"}
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))       # the emu package
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def call_site() -> str:
    """"file.py:line" of the innermost frame outside mc2-emu and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith((_HERE, _TORCH)) and "importlib" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass(frozen=True)
class Fingerprint:
    """One collective as a rank issues it: op, input shapes and dtypes, the caller's file:line."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    site: str

    @classmethod
    def of(cls, op: str, inputs, site: str) -> "Fingerprint":
        ts = _tensors(inputs)
        return cls(op, tuple(tuple(t.shape) for t in ts), tuple(str(t.dtype).replace("torch.", "") for t in ts),
                   site)

    def key(self) -> tuple:
        """What every member must agree on: the op (a send and its recv are both "p2p"), and for
        collectives whose inputs must match, shapes and dtypes (the emulator's ops check their
        own attributes)."""
        if self.op in ("dispatch", "combine"):
            return (self.op,)
        return ("p2p" if self.op in P2P else self.op, self.shapes if self.op in SAME_SHAPES else (), self.dtypes)

    def describe(self) -> str:
        if self.op in ("dispatch", "combine") or not self.shapes:
            return f"{self.op} at {self.site}"
        args = ", ".join(f"{list(s)} {d}" for s, d in zip(self.shapes, self.dtypes))
        return f"{self.op}({args}) at {self.site}"


class WatchDivergence(PeerError):
    """Ranks of a group issued different collectives at the same point (kind MISMATCHED_CALL)."""


class MC2GroupShared(PeerError):
    """A collective other than the emulator's ops ran on an MC2 group between a dispatch and its
    combine: the operators' docs forbid other collectives on the MC2 communication domain."""


class Jitter:
    """A seeded random delay of 0..``ms`` ms before each collective of this rank."""

    def __init__(self, ms: float, seed: int):
        self.ms = ms
        self.seed = seed
        self._rng: random.Random | None = None

    @classmethod
    def from_env(cls) -> "Jitter | None":
        ms = float(os.environ.get("EMU_JITTER_MS", "0") or 0)
        return cls(ms, int(os.environ.get("EMU_JITTER_SEED", "0") or 0)) if ms > 0 else None

    def sleep(self) -> float:
        """Sleep this rank's next delay; returns it in ms."""
        if self._rng is None:
            self._rng = random.Random(self.seed * 1_000_003 + (dist.get_rank() if dist.is_initialized() else 0))
        delay = self._rng.uniform(0, self.ms)
        time.sleep(delay / 1000)
        return delay


def _poll(store, keys: list[str], limit_s: float) -> bool:
    """Wait until every key is in the store (True) or ``limit_s`` passed (False); polls, so a
    timeout is quiet (the store's own wait logs at C++ level)."""
    deadline, pause = time.monotonic() + limit_s, 0.0005
    while not store.check(keys):
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 0.02)
    return True


class Watcher:
    """This rank's view of every watched collective (see module doc)."""

    def __init__(self, strict: bool, recorder: FlightRecorder, name_of: Callable[[object], str],
                 jitter: Jitter | None = None, trace_dir: Callable[[], str | None] = lambda: None,
                 capacity: int = 256):
        self.strict = strict
        self.trace_dir = trace_dir
        self.recorder = recorder
        self.name_of = name_of
        self.jitter = jitter
        self.seq: dict[str, int] = {}
        self.ring: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._originals: dict[str, Callable] = {}
        self.open_mc2: dict[str, dict] = {}             # group -> its dispatch, while the combine is due

    # -- recording ---------------------------------------------------------------------------
    def before(self, group: str, ranks: list[int], fp: Fingerprint) -> dict:
        """Note (and in strict mode check) a collective about to be issued; returns its record."""
        delay = self.jitter.sleep() if self.jitter is not None else 0.0
        with self._lock:
            seq = self.seq[group] = self.seq.get(group, 0) + 1
        me = dist.get_rank()
        peer = next((r for r in ranks if r != me), None) if group.startswith("p2p ") else None
        rec = {"rank": me, "group": group, "group_ranks": list(ranks), "seq": seq, **asdict(fp), "out_shapes": [],
               "peer": peer, "t0": time.monotonic_ns(), "t1": None, "jitter_ms": round(delay, 3), "pid": os.getpid()}
        self.ring.append(rec)
        self.recorder._set(f"emu_watch_last/{rec['rank']}", json.dumps(rec))
        self._write(rec)
        if self.strict:
            self._check(rec, fp)
        self._mc2_rule(rec, fp)
        return rec

    def _mc2_rule(self, rec: dict, fp: Fingerprint) -> None:
        """Between a dispatch and its combine, no other collective may use their group: raise
        (strict) or warn (record)."""
        group = rec["group"]
        if fp.op == "dispatch":
            self.open_mc2[group] = rec
        elif fp.op == "combine":
            self.open_mc2.pop(group, None)
        elif group in self.open_mc2:
            d = self.open_mc2[group]
            text = (f"rank {rec['rank']}: {self._where(rec)}: {fp.describe()} runs on the MC2 group between dispatch "
                    f"at {d['site']} (seq {d['seq']}) and its combine; the operators forbid other collectives on "
                    f"the MC2 communication domain (use another group)")
            if self.strict:
                raise MC2GroupShared(TILING_ERROR, text, kind=ErrorKind.BAD_INPUT, culprits=())
            warnings.warn(text, stacklevel=4)

    def after(self, rec: dict, failed: bool = False) -> None:
        """The collective returned (``failed``: it raised, so it never completed: t1 stays None)."""
        rec["t1"] = None if failed else time.monotonic_ns()
        self._write({"end": True, "rank": rec["rank"], "group": rec["group"], "seq": rec["seq"], "t1": rec["t1"]})

    def _write(self, rec: dict) -> None:
        """One line of ``watch-rank<r>.jsonl`` in the trace directory (a record when issued, an
        ``end`` line when it completes), when tracing is on."""
        directory = self.trace_dir()
        if not directory:
            return
        if self._file is None:
            os.makedirs(directory, exist_ok=True)
            self._file = open(os.path.join(directory, f"watch-rank{rec['rank']}.jsonl"), "a", buffering=1)
        self._file.write(json.dumps(rec) + "\n")

    # -- strict ------------------------------------------------------------------------------
    def _check(self, rec: dict, fp: Fingerprint) -> None:
        """Every member's fingerprint for (group, seq) through the store; raise on divergence."""
        store = self.recorder.store
        if store is None:
            return
        base = f"emu_watch/{rec['group']}/{rec['seq']}"
        store.set(f"{base}/{rec['rank']}", json.dumps(asdict(fp)))
        keys = [f"{base}/{r}" for r in rec["group_ranks"]]
        limit = float(os.environ.get("EMU_TIMEOUT_S", "60"))
        if not _poll(store, keys, limit):
            missing = [r for r, k in zip(rec["group_ranks"], keys) if not store.check([k])]
            lasts = []
            for r in missing:
                raw = self.recorder._get(f"emu_watch_last/{r}")
                last = json.loads(raw) if raw else None
                lasts.append(f"rank {r} never got there (last: " + (
                    f"{Fingerprint(last['op'], (), (), last['site']).describe()}, group {last['group']} seq "
                    f"{last['seq']})" if last else "no collective)"))
            raise CollectiveError(f"rank {rec['rank']}: {self._where(rec)}: {fp.describe()} waited {limit:g} s: "
                                  + "; ".join(lasts), ErrorKind.TIMEOUT, tuple(missing))
        prints = {r: Fingerprint(**{k: tuple(map(tuple, v)) if k == "shapes" else tuple(v) if k == "dtypes" else v
                                    for k, v in json.loads(store.get(k)).items()})
                  for r, k in zip(rec["group_ranks"], keys)}
        kinds: dict[tuple, list[int]] = {}
        for r, f in prints.items():
            kinds.setdefault(f.key(), []).append(r)
        if len(kinds) > 1:
            parts = sorted(kinds.values(), key=lambda rs: (-len(rs), rs))
            desc = "; ".join(f"{who(rs)} called {prints[rs[0]].describe()}" for rs in parts)
            odd = tuple(sorted(r for rs in parts[1:] for r in rs))
            raise WatchDivergence(TILING_ERROR, f"rank {rec['rank']}: {self._where(rec)}: {desc}",
                                  kind=ErrorKind.MISMATCHED_CALL, culprits=odd)

    @staticmethod
    def _where(rec: dict) -> str:
        return f"group {rec['group']} ({who(rec['group_ranks'])}), seq {rec['seq']}"

    # -- torch.distributed -------------------------------------------------------------------
    def install(self) -> None:
        """Wrap torch.distributed's collectives (idempotent)."""
        for name in WRAPPED:
            original = getattr(dist, name)
            if getattr(original, "__emu_watched__", False):
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _group_of(self, name: str, args: tuple, kwargs: dict) -> tuple[str, list[int]] | None:
        """(group name, member global ranks) of a call; p2p: a channel per (source, destination)."""
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None) or dist.group.WORLD
        if name in P2P:
            peer = kwargs.get(P2P[name], args[1] if len(args) > 1 and isinstance(args[1], int) else None)
            if peer is None:
                return None
            me = dist.get_rank()
            src, dst = (me, peer) if P2P[name] == "dst" else (peer, me)
            return f"p2p {src}->{dst}", [src, dst]
        return self.name_of(group), dist.get_process_group_ranks(group)

    def _wrap(self, name: str, original: Callable) -> Callable:
        watcher = self

        def watched(*args, **kwargs):
            where = watcher._group_of(name, args, kwargs) if dist.is_initialized() else None
            if where is None:
                return original(*args, **kwargs)
            fp = Fingerprint.of(name, args[:1] if name != "barrier" else (), call_site())
            rec = watcher.before(*where, fp)
            try:
                result = original(*args, **kwargs)
            except BaseException:
                watcher.after(rec, failed=True)
                raise
            watcher.after(rec)
            return result

        watched.__emu_watched__ = True
        watched.__wrapped__ = original
        watched.__name__ = name
        return watched
