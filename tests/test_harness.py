"""The public test harness itself (emu.testing): typed outcomes, per-rank arguments, faults,
a hung rank (deadline, stacks, a fresh world after it), unpicklable results, and a suite of
its three pytest styles run under pytest-xdist with two workers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import emu
import emu.testing as et
from emu.core.errors import ErrorKind, RankState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.emu_world(2), pytest.mark.timeout(240)]


def where_am_i(extra):
    ctx = et.this_rank()
    return ctx.rank, ctx.size, ctx.group_ep, extra


def fail_on(rank):
    if et.this_rank().rank == rank:
        raise ValueError(f"rank {rank} says no")
    return "fine"


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("it carries a lambda")
        self.fn = lambda: None


def raise_unpicklable():
    raise Unpicklable()


def return_unpicklable():
    return lambda: None


def sleep_on(rank, seconds):
    if et.this_rank().rank == rank:
        time.sleep(seconds)
    return et.this_rank().rank


def dispatch_once(perf: bool = False):
    ctx = et.this_rank()
    x = torch.ones(2, 1024, dtype=torch.bfloat16)
    ids = torch.tensor([[0], [1]], dtype=torch.int32)
    info = torch.zeros(ctx.size, dtype=torch.int64) if perf else None
    emu.moe_distribute_dispatch_v2(x, ids, ctx.group_ep, ctx.size, ctx.rank, ctx.size, performance_info=info)
    return info


def test_outcomes_are_typed_with_remote_tracebacks(emu_world):
    got = emu_world.run(where_am_i, et.per_rank(["a", "b"]))
    assert [o.get() for o in got] == [(0, 2, got[0].value[2], "a"), (1, 2, got[0].value[2], "b")]
    assert got[0].value[2].startswith("emu_hccl_")
    out = emu_world.run(fail_on, 1)
    assert out[0].ok and out[0].value == "fine"
    err = out[1].error
    assert err.type_name == "ValueError" and err.message == "rank 1 says no" and err.is_a("Exception")
    assert "in fail_on" in err.traceback and "test_harness.py" in err.traceback
    with pytest.raises(et.RankFailed, match="rank 1 raised ValueError: rank 1 says no"):
        out[1].get()


def dispatch_with(quant_mode):
    ctx = et.this_rank()
    x, ids = torch.ones(2, 1024, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.int32)
    return emu.moe_distribute_dispatch_v2(x, ids, ctx.group_ep, ctx.size, ctx.rank, 2, quant_mode=quant_mode)[3]


def size_tensor():
    return torch.tensor([et.this_rank().size])


def rank_tensor():
    return torch.tensor([et.this_rank().rank])


def test_emulator_errors_keep_their_kind_and_code(emu_world):
    et.assert_all_raise(emu_world.run(dispatch_with, 1), code=561002, kind=ErrorKind.BAD_INPUT,
                        type_name="AclnnError")
    et.assert_same_on_all_ranks(emu_world.run(size_tensor))
    with pytest.raises(AssertionError, match="rank 1's value differs"):
        et.assert_same_on_all_ranks(emu_world.run(rank_tensor))
    with pytest.raises(AssertionError, match="rank 1 returned"):
        et.assert_all_raise(emu_world.run(fail_on, 0), type_name="ValueError")


def test_unpicklable_exception_and_return_value_still_report(emu_world):
    raised = emu_world.run(raise_unpicklable)
    assert all(o.error.type_name == "Unpicklable" and o.error.message == "it carries a lambda" for o in raised)
    returned = emu_world.run(return_unpicklable)
    assert all(o.error.type_name == "UnpicklableReturn" and "cannot be sent back" in o.error.message
               for o in returned)
    assert [o.get() for o in emu_world.run(where_am_i, 1)][1][:2] == (1, 2)          # the world goes on


def test_fault_injection_kill_and_delay(emu_pool):
    spec = et.WorldSpec.of(2, emu_timeout=10)
    world = emu_pool.get(spec)
    slow = world.run(dispatch_once, True, faults=[et.Fault.delay(1, "dispatch:EP header", 0.4)])
    assert all(o.ok for o in slow) and slow[1].seconds >= 0.4                   # the delay ran inside rank 1's call
    waited = slow[0].value                                          # rank 0's performance_info (us per source)
    assert waited[1] > waited[0]                                                # rank 0 waited for rank 1, not itself
    killed = world.run(dispatch_once, faults=[et.Fault.kill(1, "dispatch:EP header")])
    assert killed[1].exit_code == 1
    err = killed[0].error
    assert err.type_name == "CollectiveError" and err.kind == ErrorKind.DEAD_PEER and err.culprits == (1,)
    assert err.states == {1: RankState.DEAD}
    assert not world.healthy and emu_pool.get(spec) is not world                # a fresh world next time


def test_hung_rank_gives_stacks_and_a_fresh_world(emu_pool):
    spec = et.WorldSpec.of(2)
    world = emu_pool.get(spec)
    pids = [p.pid for p in world.procs]
    with pytest.raises(et.WorldHung) as info:
        world.run(sleep_on, 1, 60, deadline_s=3)
    report = str(info.value)
    assert "ranks [1] did not answer within 3 s" in report
    assert "rank 1: waiting, in sleep_on at test_harness.py:" in report
    assert "--- Python stack of rank 1 ---" in report and "rank 0: returned" in report
    fresh = emu_pool.get(spec)
    assert [p.pid for p in fresh.procs] != pids and not any(p.is_alive() for p in world.procs)
    assert [o.get() for o in fresh.run(sleep_on, 1, 0)] == [0, 1]


SUITE_A = '''
import pytest, torch, emu, emu.testing as et

pids = []

def my_pid():
    import os
    return os.getpid()

@pytest.mark.emu_world(2)
def test_fails_on_purpose(emu_world):
    pids.extend(o.get() for o in emu_world.run(my_pid))
    assert False, "deliberately"

@pytest.mark.emu_world(2)
def test_next_test_gets_a_fresh_world(emu_world):
    now = [o.get() for o in emu_world.run(my_pid)]
    assert len(pids) == 2 and set(now).isdisjoint(pids)
'''
SUITE_B = '''
import torch, emu, emu.testing as et

@et.world(2)
def test_decorated_body_runs_on_every_rank():
    ctx = et.this_rank()
    x = torch.ones(2, 1024, dtype=torch.bfloat16) * ctx.rank
    ids = torch.tensor([[0], [1]], dtype=torch.int32)
    out = emu.moe_distribute_dispatch_v2(x, ids, ctx.group_ep, ctx.size, ctx.rank, 2)
    assert out[0][:2, 0].tolist() == [0.0, 1.0]

class TestStyle(et.DistributedTest):
    world_size = [2, 3]
    def test_sizes(self):
        assert et.this_rank().size in (2, 3)
'''


def test_three_styles_under_xdist_with_two_workers(tmp_path):
    """Two modules on two xdist workers, each with worlds of its own (ports chosen by the OS):
    a failing test's world is replaced before the next test; the decorator and class styles."""
    (tmp_path / "test_a.py").write_text(textwrap.dedent(SUITE_A))
    (tmp_path / "test_b.py").write_text(textwrap.dedent(SUITE_B))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadfile", str(tmp_path)], capture_output=True, text=True, timeout=200,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT))
    tail = out.stdout.strip().splitlines()[-1]
    assert "1 failed, 4 passed" in tail, out.stdout[-3000:] + out.stderr[-2000:]
    assert "test_fails_on_purpose" in out.stdout and "deliberately" in out.stdout
