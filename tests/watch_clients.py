"""Clients with the ordering bugs MoE users meet around the MC2 calls (run on every rank of a
world with EMU_WATCH=strict).  Line numbers matter: tests assert the call sites."""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

import emu
import emu.testing as et

E, H = 8, 1024


def _tokens(bs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bs, H, generator=g).bfloat16(), torch.rand(bs, E, generator=g).argsort(1)[:, :2].int()


def _layer(x, ids, global_bs: int = 0):
    r = et.this_rank()
    out = emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E, global_bs=global_bs)
    y = out[0].clone()
    return emu.moe_distribute_combine_v2(y, ids, out[2], out[4], torch.ones(ids.shape), r.group_ep, r.size, r.rank,
                                         E, global_bs=global_bs)


def correct_client(steps: int = 2):
    r = et.this_rank()
    for step in range(steps):
        x, ids = _tokens(4, r.rank * 10 + step)
        _layer(x, ids)
    return "ok"


def data_parallel_branch():
    """Rank 1 takes the other branch: it syncs a loss while the others run the MoE layer."""
    r = et.this_rank()
    x, ids = _tokens(4, r.rank)
    if r.rank == 1:
        dist.all_reduce(torch.zeros(8, H).bfloat16())                      # the data-parallel branch
    return _layer(x, ids)                                                    # the MoE branch


def skipped_warmup():
    """The last rank skips the warm-up call pair."""
    r = et.this_rank()
    x, ids = _tokens(4, r.rank)
    if r.rank != r.size - 1:
        _layer(x, ids)                                                       # warm-up
    return _layer(x, ids)                                                    # the real call


def global_bs_from_local_tokens():
    """Each rank derives global_bs from its own token count (they must all pass the same)."""
    r = et.this_rank()
    bs = 4 if r.rank < 2 else 6
    x, ids = _tokens(bs, r.rank)
    return _layer(x, ids, global_bs=bs * r.size)


def tp_collective_on_ep_group():
    """A TP all-reduce issued on the EP group between dispatch and combine."""
    r = et.this_rank()
    x, ids = _tokens(4, r.rank)
    out = emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E)
    dist.all_reduce(out[0][:1].float(), group=r.ep_group)                    # meant for the TP group
    return emu.moe_distribute_combine_v2(out[0], ids, out[2], out[4], torch.ones(ids.shape), r.group_ep, r.size,
                                         r.rank, E)


def send_recv_mismatch():
    """Rank 0 sends 4 rows, rank 1 expects 8."""
    r = et.this_rank()
    if r.rank == 0:
        dist.send(torch.zeros(4, 16), dst=1)
    elif r.rank == 1:
        dist.recv(torch.zeros(8, 16), src=0)
    return "done"


def metrics_thread_race(steps: int = 4):
    """After each step the main thread lets a metrics thread all-reduce on the MoE layer's group,
    runs a 10 ms optimizer step, then the next step's dispatch: without delays the all-reduce
    always comes first on every rank; a few ms of delay before a collective reorders them on
    some ranks (on the NPU: another collective on the MC2 group, a hang)."""
    r = et.this_rank()
    errors, ready = [], threading.Semaphore(0)

    def metrics():
        try:
            for _ in range(steps):
                ready.acquire()
                dist.all_reduce(torch.ones(1))                   # races the next step's dispatch
        except Exception as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)

    t = threading.Thread(target=metrics)
    t.start()
    try:
        for step in range(steps):
            x, ids = _tokens(4, r.rank * 10 + step)
            _layer(x, ids)
            ready.release()
            time.sleep(0.01)                                          # the optimizer step
    finally:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return "ok"


def jitter(ms: float, seed: int) -> None:
    emu.set_jitter(ms, seed)
