"""Long-lived multi-process worlds for tests: start n ranks once, run many functions on them.

    world = World(WorldSpec(4))                       # 4 OS processes joined in one gloo group
    outcomes = world.run(fn, per_rank(xs), 7)         # fn(xs[r], 7) on every rank r at once
    outcomes[2].get()                                 # rank 2's return value, or RankFailed

Each rank answers with a typed :class:`Outcome`: its return value, or the exception it raised
(:class:`RankError`: class, message, remote traceback, and for emulator errors the code, kind,
culprits and peer states), or the exit code of a process that died.  A command that misses
its deadline raises :class:`WorldHung` with every waiting rank's Python stack and last
collectives, and the world is torn down.  Inside ``fn``, :func:`this_rank` gives the rank,
its EP / TP groups (the layout of docs/dispatch.md: world rank = ep_rank * tp + tp_rank) and their
names.  :class:`Fault` kills, hangs or delays a rank at a named collective of the emulator.

The rendezvous store lives in the test process, so ranks may die without taking it with them;
its port is chosen by the OS, so worlds of parallel test workers never collide.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from ..comm.context import current
from ..comm.groups import group_name
from ..comm.watching import watch_from_env
from ..core.errors import ErrorKind, RankState
from ..debug.flight import FlightRecorder, innermost_user_frame


@dataclass(frozen=True)
class WorldSpec:
    """A world: ``size`` ranks, the chip (``soc`` A3 / A2), the TP layout (``tp`` 1 or 2), a
    command's deadline, the ranks' EMU_TIMEOUT_S, and extra environment variables."""

    size: int
    soc: str = "A3"
    tp: int = 1
    timeout_s: float = 120.0
    emu_timeout_s: float | None = None         # None: EMU_TIMEOUT_S of the test process, else 30
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, size: int, soc: str = "A3", tp: int = 1, timeout: float = 120.0, emu_timeout: float | None = None,
           env: dict | None = None) -> "WorldSpec":
        return cls(size, soc.upper(), tp, float(timeout), emu_timeout, tuple(sorted((env or {}).items())))

    def rank_env(self) -> dict[str, str]:
        emu_timeout = f"{self.emu_timeout_s:g}" if self.emu_timeout_s else os.environ.get("EMU_TIMEOUT_S", "30")
        return {**dict(self.env), "OMP_NUM_THREADS": "1", "EMU_SOC": self.soc, "EMU_TIMEOUT_S": emu_timeout}


@dataclass(frozen=True)
class RankContext:
    """What a function running on a rank needs: its ranks, its groups and their names.

    rank / size: global; ep_rank / ep_size, tp_rank / tp (1 or 2): docs/dispatch.md layout;
    ep_group / tp_group: ProcessGroups (tp_group None with tp 1); group_ep / group_tp: the
    names the operators take (``emu.group_name``; group_tp "" with tp 1); soc: the chip.
    """

    rank: int
    size: int
    ep_rank: int
    ep_size: int
    tp_rank: int
    tp: int
    ep_group: Any
    tp_group: Any
    group_ep: str
    group_tp: str
    soc: str


@dataclass(frozen=True)
class Fault:
    """Make ``rank`` fail at the emulator collective ``at`` ("op:phase", e.g. "dispatch:EP rows"):
    ``exit`` (its process exits with code 1), ``hang`` (it sleeps forever), or ``delay=S``."""

    rank: int
    at: str
    action: str = "exit"

    @classmethod
    def kill(cls, rank: int, at: str) -> "Fault":
        return cls(rank, at)

    @classmethod
    def hang(cls, rank: int, at: str) -> "Fault":
        return cls(rank, at, "hang")

    @classmethod
    def delay(cls, rank: int, at: str, seconds: float) -> "Fault":
        return cls(rank, at, f"delay={seconds:g}")

    def spec(self) -> str:
        return f"{self.rank}:{self.at}:{self.action}"


@dataclass(frozen=True)
class PerRank:
    """An argument whose element r goes to rank r."""

    values: tuple


def per_rank(values) -> PerRank:
    """Give rank r ``values[r]`` as this argument of :meth:`World.run`."""
    return PerRank(tuple(values))


@dataclass(frozen=True)
class RankError:
    """An exception a rank raised, as data: class name (and its bases), message, the remote
    traceback, and for emulator errors the aclnn code, the kind, the culprits and peer states."""

    type_name: str
    message: str
    traceback: str
    bases: tuple[str, ...] = ()
    code: int | None = None
    kind: ErrorKind | None = None
    culprits: tuple[int, ...] = ()
    states: dict[int, RankState] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: BaseException) -> "RankError":
        return cls(type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)),
                   tuple(c.__name__ for c in type(exc).__mro__), getattr(exc, "code", None),
                   getattr(exc, "kind", None), tuple(getattr(exc, "culprits", ())), dict(getattr(exc, "states", {})))

    def is_a(self, name: str) -> bool:
        return name in self.bases


class RankFailed(AssertionError):
    """A rank did not return a value (it raised, or its process died)."""


@dataclass
class Outcome:
    """What one rank did with one command: ``value``, or ``error``, or ``exit_code`` (died)."""

    rank: int
    value: Any = None
    error: RankError | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    leaving: bool = False          # answered through :func:`leave`: its process is ending

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code is None

    def get(self) -> Any:
        """The value, or RankFailed with the remote traceback."""
        if self.error is not None:
            raise RankFailed(f"rank {self.rank} raised {self.error.type_name}: {self.error.message}\n"
                             f"--- remote traceback (rank {self.rank}) ---\n{self.error.traceback}")
        if self.exit_code is not None:
            raise RankFailed(f"rank {self.rank}: its process exited with code {self.exit_code}")
        return self.value


class WorldHung(AssertionError):
    """A command missed its deadline; the message has every waiting rank's stack."""


@dataclass(frozen=True)
class Target:
    """A function named by module and qualified name (for bodies pickle cannot name: a test
    replaced by its wrapper, a method).  ``method``: call it on a fresh instance of its class."""

    module: str
    qualname: str
    method: bool = False

    def resolve(self):
        obj: Any = importlib.import_module(self.module)
        owner = None
        for part in self.qualname.split("."):
            owner, obj = obj, getattr(obj, part)
        body = getattr(obj, "__emu_body__", obj)
        if self.method:
            instance = owner()
            return lambda *a, **k: body(instance, *a, **k)
        return body


_here: RankContext | None = None
_outbox = None


def this_rank() -> RankContext:
    """The calling rank's context (inside a function a :class:`World` runs)."""
    if _here is None:
        raise RuntimeError("this_rank() is only available on a rank of an emu.testing world")
    return _here


def leave(value: Any = None) -> None:
    """Answer the current command with ``value``, then end this rank's process with code 0
    (a removed rank that leaves, as torchrun allows)."""
    _outbox.put((_here.rank, pickle.dumps(Outcome(_here.rank, value=value, leaving=True))))
    _outbox.close()
    _outbox.join_thread()
    os._exit(0)


def _layout(spec: WorldSpec) -> RankContext:
    """Every rank makes the same groups in the same order (docs/dispatch.md layout)."""
    me, n, T = dist.get_rank(), spec.size, spec.tp
    ep_group = tp_group = None
    for i in range(T):
        g = dist.new_group([e * T + i for e in range(n // T)]) if T > 1 else dist.group.WORLD
        if me % T == i:
            ep_group = g
    if T > 1:
        for e in range(n // T):
            g = dist.new_group([e * T, e * T + 1])
            if me // T == e:
                tp_group = g
    return RankContext(rank=me, size=n, ep_rank=me // T, ep_size=n // T, tp_rank=me % T, tp=T, ep_group=ep_group,
                       tp_group=tp_group, group_ep=group_name(ep_group),
                       group_tp=group_name(tp_group) if tp_group is not None else "", soc=spec.soc)


def _reply(rank: int, outcome: Outcome) -> bytes:
    """The pickled outcome; an unpicklable return value becomes a RankError saying so (an
    exception is data already, see RankError)."""
    try:
        return pickle.dumps(outcome)
    except Exception as exc:  # noqa: BLE001 - whatever pickle raises goes back as data
        text = f"rank {rank}'s return value cannot be sent back ({type(exc).__name__}: {exc}): {outcome.value!r:.300}"
        return pickle.dumps(Outcome(rank, error=RankError("UnpicklableReturn", text, "", ("UnpicklableReturn",)),
                                    seconds=outcome.seconds))


def _serve(rank: int, spec: WorldSpec, port: int, inbox, outbox) -> None:
    """A rank: join the world, make the groups, then run commands until told to stop."""
    global _here, _outbox
    os.environ.update(spec.rank_env())
    watch_from_env()                               # EMU_WATCH / EMU_JITTER_MS of the world
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=spec.timeout_s))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.size,
                            timeout=timedelta(seconds=spec.timeout_s))
    _here, _outbox = _layout(spec), outbox
    current()                                      # flight recorder: pid and stack file registered
    outbox.put((rank, b"ready"))
    while True:
        cmd = inbox.get()
        if cmd is None:
            break
        target, args, kwargs, env = pickle.loads(cmd)
        t0 = time.monotonic()
        try:
            fn = target.resolve() if isinstance(target, Target) else target
            with mock.patch.dict(os.environ, env):
                outcome = Outcome(rank, value=fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
            outcome = Outcome(rank, error=RankError.of(exc))
        outcome.seconds = time.monotonic() - t0
        outbox.put((rank, _reply(rank, outcome)))
    _here = None
    dist.destroy_process_group()
    os._exit(0)


class World:
    """``spec.size`` rank processes, started once; :meth:`run` runs one function on all."""

    def __init__(self, spec: WorldSpec | int):
        self.spec = spec if isinstance(spec, WorldSpec) else WorldSpec(spec)
        self.procs: list = []
        self.dead: set[int] = set()
        self.hung = False
        self.startup_s = 0.0

    @property
    def n(self) -> int:
        return self.spec.size

    def start(self) -> "World":
        """Spawn the ranks and wait until every one has joined (at most the spec's deadline)."""
        ctx = mp.get_context("spawn")
        t0 = time.monotonic()
        self.store = dist.TCPStore("127.0.0.1", 0, world_size=self.n + 1, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=self.spec.timeout_s))
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(self.n)]
        self.procs = [ctx.Process(target=_serve, args=(r, self.spec, self.store.port, self.inboxes[r], self.outbox),
                                  daemon=True, name=f"emu-rank{r}") for r in range(self.n)]
        for p in self.procs:
            p.start()
        waiting = set(range(self.n))
        while waiting:
            try:
                rank, _ = self.outbox.get(timeout=0.2)
                waiting.discard(rank)
            except queue.Empty:
                if any(not self.procs[r].is_alive() for r in waiting) or time.monotonic() - t0 > self.spec.timeout_s:
                    self.close(force=True)
                    raise RuntimeError(f"ranks {sorted(waiting)} of a {self.n}-rank world did not start")
        self.startup_s = time.monotonic() - t0
        return self

    @property
    def healthy(self) -> bool:
        """Every process alive and no command missed its deadline."""
        return bool(self.procs) and not self.hung and not self.dead and all(p.is_alive() for p in self.procs)

    def _payload(self, r: int, fn, args: tuple, kwargs: dict, env: dict) -> bytes:
        pick = lambda v: v.values[r] if isinstance(v, PerRank) else v          # noqa: E731
        return pickle.dumps((fn, tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}, env))

    def run(self, fn, *args, deadline_s: float | None = None, env: dict | None = None,
            faults: list[Fault] | tuple[Fault, ...] = (), **kwargs) -> list[Outcome]:
        """``fn(*args, **kwargs)`` on every live rank (a :class:`PerRank` argument gives rank r
        its element r); returns the n outcomes (a rank that died answers with its exit code).
        ``env``: environment variables for the call; ``faults``: collectives to fail at."""
        env = dict(env or {})
        if faults:
            env["EMU_FAULT"] = ";".join(f.spec() for f in faults)
        live = [r for r in range(self.n) if r not in self.dead]
        payloads = {r: self._payload(r, fn, args, kwargs, env) for r in live}      # unpicklable: raises here
        for r in live:
            self.inboxes[r].put(payloads[r])
        results: list[Outcome] = [Outcome(r, exit_code=self.procs[r].exitcode) for r in range(self.n)]
        waiting = set(live)
        deadline = time.monotonic() + (deadline_s or self.spec.timeout_s)
        while waiting:
            try:
                rank, data = self.outbox.get(timeout=0.2)
            except queue.Empty:
                for r in list(waiting):
                    if not self.procs[r].is_alive():                            # died without answering
                        waiting.discard(r)
                        self.dead.add(r)
                        results[r] = Outcome(r, exit_code=self.procs[r].exitcode)
                if waiting and time.monotonic() > deadline:
                    report = self._hang_report(sorted(waiting), results, deadline_s or self.spec.timeout_s)
                    self.hung = True
                    self.close(force=True)
                    raise WorldHung(report)
                continue
            waiting.discard(rank)
            results[rank] = pickle.loads(data)
        for r in range(self.n):                                                     # ranks that left
            left = results[r].leaving or not self.procs[r].is_alive()
            if r not in self.dead and r in live and left and results[r].ok:
                self.procs[r].join(timeout=20)                                      # said it leaves: it will
                self.dead.add(r)
        return results

    def _hang_report(self, waiting: list[int], results: list[Outcome], limit: float) -> str:
        """Every waiting rank's innermost frame, full stack and last collective."""
        recorder = FlightRecorder(store=self.store)
        dumps = recorder.fetch_stacks(waiting)
        lines = [f"{self.n}-rank world: ranks {waiting} did not answer within {limit:g} s"]
        for r in range(self.n):
            if r in waiting:
                last = recorder.last_record(r)
                where = innermost_user_frame(dumps[r]) if r in dumps else None
                lines.append(f"rank {r}: waiting, {where or 'stack unavailable'}; last collective: "
                             + (f"{last['op']} #{last['call']} {last['phase']} (group {last['group']}, seq {last['seq']})"
                                if last else "none"))
            else:
                o = results[r]
                lines.append(f"rank {r}: " + ("returned" if o.ok else f"raised {o.error.type_name}" if o.error
                                                else f"exited ({o.exit_code})"))
        for r in waiting:
            if r in dumps:
                lines.append(f"--- Python stack of rank {r} ---\n{dumps[r].strip()}")
        return "\n".join(lines)

    def close(self, force: bool = False) -> None:
        """Stop the ranks (``force``: kill them at once)."""
        if not force:
            for r, q in enumerate(self.inboxes if self.procs else []):
                if r not in self.dead and self.procs[r].is_alive():
                    q.put(None)
            for p in self.procs:
                p.join(timeout=20)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "World":
        return self.start() if not self.procs else self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)


class WorldPool:
    """Worlds by spec, started on first use and reused; a world whose command hung, whose
    ranks died, or that served a failing test is replaced by a fresh one."""

    def __init__(self):
        self.worlds: dict[WorldSpec, World] = {}
        self.tainted: set[WorldSpec] = set()

    def get(self, spec: WorldSpec) -> World:
        world = self.worlds.get(spec)
        if world is not None and (spec in self.tainted or not world.healthy):
            world.close(force=True)
            world = None
        if world is None:
            world = self.worlds[spec] = World(spec).start()
            self.tainted.discard(spec)
        return world

    def taint(self, spec: WorldSpec) -> None:
        self.tainted.add(spec)

    def close(self) -> None:
        for world in self.worlds.values():
            world.close(force=world.hung or bool(world.dead))
        self.worlds.clear()

