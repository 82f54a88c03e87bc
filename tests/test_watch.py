"""Ordering bugs around the MC2 calls, diagnosed on every rank by the strict watch
(EMU_WATCH=strict) with the divergence point and the call sites (tests/watch_clients.py, 4
real processes, a fresh world per buggy client)."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import watch_clients as wc
from emu.core.errors import ErrorKind
from emu.debug import events as trace_events
from emu.debug import report
from emu.debug.divergence import load_watch
from emu.debug.watch import Jitter
from emu.testing import WorldSpec

STRICT = dict(env={"EMU_WATCH": "strict"}, emu_timeout=5, fresh=True)
pytestmark = pytest.mark.timeout(240)


def at(text: str) -> str:
    """"watch_clients.py:<line>" of the first line of watch_clients.py containing ``text``."""
    lines = inspect.getsource(wc).splitlines()
    return f"watch_clients.py:{next(i for i, line in enumerate(lines, 1) if text in line)}"


DISPATCH = at("out = emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E, global_bs")
COMBINE = at("return emu.moe_distribute_combine_v2(y, ids")


@pytest.mark.emu_world(4, **STRICT)
def test_a_correct_client_passes(world):
    assert [o.get() for o in world.run(wc.correct_client)] == ["ok"] * 4


@pytest.mark.emu_world(4, **STRICT)
def test_data_parallel_branch_all_reduce_against_dispatch(world):
    for o in world.run(wc.data_parallel_branch):
        e = o.error
        assert e.type_name == "WatchDivergence" and e.kind == ErrorKind.MISMATCHED_CALL and e.culprits == (1,), e
        assert f"ranks 0, 2-3 called dispatch at {DISPATCH}; rank 1 called all_reduce([8, 1024] bfloat16) at " \
               f"{at('the data-parallel branch')}" in e.message, e.message


@pytest.mark.emu_world(4, **STRICT)
def test_a_rank_skipping_the_warmup(world):
    got = world.run(wc.skipped_warmup)
    assert got[3].ok                                      # it ran one pair fewer and left
    for o in got[:3]:
        e = o.error
        assert e.type_name == "CollectiveError" and e.kind == ErrorKind.TIMEOUT and e.culprits == (3,), e
        assert f"dispatch at {DISPATCH} waited 5 s: rank 3 never got there (last: combine at {COMBINE}" in e.message


@pytest.mark.emu_world(4, **STRICT)
def test_global_bs_from_local_token_counts(world):
    for o in world.run(wc.global_bs_from_local_tokens):
        e = o.error
        assert e.kind == ErrorKind.MISMATCHED_ATTRIBUTE and e.culprits == (0, 1, 2, 3), e   # a tie: all blamed
        assert "attribute global_bs (or Bs*ep_world_size) differs" in e.message
        assert "ranks 0-1 passed 16 while ranks 2-3 passed 24" in e.message or \
               "ranks 2-3 passed 24 while ranks 0-1 passed 16" in e.message, e.message
        assert f"; called at {DISPATCH} (ranks 0-3)" in e.message, e.message


@pytest.mark.emu_world(4, **STRICT)
def test_tp_collective_on_the_ep_group_between_dispatch_and_combine(world):
    for o in world.run(wc.tp_collective_on_ep_group):
        e = o.error
        assert e.type_name == "MC2GroupShared" and e.kind == ErrorKind.BAD_INPUT, e
        assert f"all_reduce([1, 1024] float32) at {at('meant for the TP group')} runs on the MC2 group between " \
               f"dispatch at {at('out = emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E)')}" \
               in e.message, e.message


@pytest.mark.emu_world(4, **STRICT)
def test_send_recv_mismatch(world):
    got = world.run(wc.send_recv_mismatch)
    assert got[2].get() == got[3].get() == "done"
    for o in got[:2]:
        e = o.error
        assert e.type_name == "WatchDivergence" and e.culprits == (1,), e
        assert f"group p2p 0->1 (ranks 0-1), seq 1: rank 0 called send([4, 16] float32) at " \
               f"{at('dist.send(')}; rank 1 called recv([8, 16] float32) at {at('dist.recv(')}" in e.message, e.message


def test_after_the_fact_report_and_pytorch_analyzer(emu_pool, tmp_path):
    """Record-only watch with tracing: a rank skips the warm-up.  The report names the first
    divergence with call sites, and PyTorch's flight-recorder analyzer, run as users run it on
    the dumps the report writes, names the missing rank."""
    spec = WorldSpec.of(4, env={"EMU_WATCH": "1", "EMU_TRACE": str(tmp_path)}, emu_timeout=5)
    got = emu_pool.get(spec).run(wc.skipped_warmup)
    emu_pool.taint(spec)                                  # its ranks are out of step now
    assert got[3].ok and all(o.error.kind == ErrorKind.TIMEOUT and o.error.culprits == (3,) for o in got[:3])
    lines = report.report(str(tmp_path), pictures=False)
    assert f"  group emu_hccl_0 (ranks 0-3), seq 3: ranks 0-2 called dispatch at {DISPATCH}; rank 3 never got " \
           f"there (last: combine at {COMBINE}, group emu_hccl_0 seq 2)" in lines, "\n".join(lines)
    assert any(line.startswith("stacks written at a timeout:") for line in lines), "\n".join(lines)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace",
                          str(tmp_path / "fr"), "-p", "rank"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "Not all ranks joining collective, sequence number: 3" in text and "missing ranks: {3}" in text, text


def test_jitter_is_seeded_and_recorded(emu_pool, tmp_path):
    """EMU_JITTER_MS delays each collective (watched or the emulator's own) by a seeded random
    0..N ms, and the traces record the delays."""
    a, b = Jitter(3, seed=7), Jitter(3, seed=7)
    assert [a.sleep() for _ in range(4)] == [b.sleep() for _ in range(4)]
    spec = WorldSpec.of(4, env={"EMU_WATCH": "1", "EMU_TRACE": str(tmp_path), "EMU_JITTER_MS": "3",
                                "EMU_JITTER_SEED": "1"})
    assert [o.get() for o in emu_pool.get(spec).run(wc.correct_client)] == ["ok"] * 4
    emu_pool.taint(spec)
    delays = [e.jitter_ms for e in trace_events.load(str(tmp_path))]
    watched = [r["jitter_ms"] for recs in load_watch(str(tmp_path)).values() for r in recs]
    assert delays and watched and all(0 <= d <= 3 for d in delays + watched) and len(set(delays)) > 1
