"""One long-lived multi-process world for many scenarios (``parallel_launch``).

``World(n)`` spawns n OS processes that join one gloo process group and then serve
commands: ``world.run("module:function", **kwargs)`` calls ``function(rank, **kwargs)`` on
every rank at once and returns the n results (or the exceptions, as :class:`Raised`).
Each command has a deadline; a world that misses it is torn down and the test fails.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import time
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

from emu.core.errors import ErrorKind

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


@dataclass
class Raised:
    """An exception a rank raised: class name, aclnn code (or None), message, and for emulator
    errors the typed kind (an ``emu.ErrorKind``) and the culprit ranks."""

    type_name: str
    code: int | None
    message: str
    bases: tuple[str, ...] = ()
    kind: ErrorKind | None = None
    culprits: tuple[int, ...] = ()

    def is_a(self, name: str) -> bool:
        return self.type_name == name or name in self.bases


def _worker(rank: int, size: int, port: int, inbox, outbox, timeout_s: float) -> None:
    sys.path[:0] = [ROOT, TESTS_DIR]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    global _outbox
    _outbox = outbox
    while True:
        cmd = inbox.get()
        if cmd is None:
            break
        target, kwargs = cmd
        mod, fn = target.split(":")
        try:
            outbox.put((rank, True, getattr(importlib.import_module(mod), fn)(rank, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
            outbox.put((rank, False, Raised(type(exc).__name__, getattr(exc, "code", None),
                                            f"{exc}\n{traceback.format_exc()}",
                                            tuple(c.__name__ for c in type(exc).__mro__),
                                            getattr(exc, "kind", None), getattr(exc, "culprits", ()))))
    import world_groups
    world_groups.clear()
    dist.destroy_process_group()
    os._exit(0)


_outbox = None


def reply_and_exit(rank: int, value) -> None:
    """Worker side: answer the current command, then end this process with code 0
    (a removed rank that leaves, as torchrun requires)."""
    _outbox.put((rank, True, value))
    _outbox.close()
    _outbox.join_thread()
    os._exit(0)


class World:
    """n ranks, started once; ``run`` broadcasts one command and gathers every result."""

    def __init__(self, n: int, timeout_s: float = 60.0):
        import torch.distributed as dist
        ctx = mp.get_context("spawn")
        self.n = n
        # the rendezvous store lives here, so ranks may die without taking it with them
        self.store = dist.TCPStore("127.0.0.1", 0, world_size=n + 1, is_master=True,
                                   wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
        port = self.store.port
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        self.dead: set[int] = set()
        self.procs = [ctx.Process(target=_worker, args=(r, n, port, self.inboxes[r], self.outbox, timeout_s),
                                  daemon=True) for r in range(n)]
        for p in self.procs:
            p.start()

    def run(self, target: str, deadline_s: float = 120.0, **kwargs) -> list:
        """Run ``target`` on every live rank; ranks that left answer "dead" from then on."""
        live = [r for r in range(self.n) if r not in self.dead]
        for r in live:
            self.inboxes[r].put((target, kwargs))
        results: list = ["dead"] * self.n
        waiting = set(live)
        deadline = time.monotonic() + deadline_s
        while waiting:
            try:
                rank, _ok, value = self.outbox.get(timeout=0.2)
            except queue.Empty:
                for r in list(waiting):                 # a rank that died without answering
                    if not self.procs[r].is_alive():
                        waiting.discard(r)
                        self.dead.add(r)
                        results[r] = f"exited({self.procs[r].exitcode})"
                if time.monotonic() > deadline:
                    self.close(force=True)
                    raise TimeoutError(f"{target} did not finish on ranks {sorted(waiting)} within {deadline_s} s")
                continue
            waiting.discard(rank)
            results[rank] = value
            if isinstance(value, str) and value == "dead":
                self.dead.add(rank)
        return results

    def close(self, force: bool = False) -> None:
        if not force:
            for r, q in enumerate(self.inboxes):
                if r not in self.dead:
                    q.put(None)
            for p in self.procs:
                p.join(timeout=20)
        for p in self.procs:
            if p.is_alive():
                p.kill()
