"""Traces of real 4-rank runs: complete, consistent, mergeable into Perfetto, reportable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from emu.debug import events as trace_events
from emu.debug import report, trace
import mp_cases
from emu.testing import WorldSpec
from mp_check import check_scenario

pytestmark = pytest.mark.timeout(300)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = [dict(ep=4, moe=6, shared_ranks=1, k=2, h=1024, quant=2, seed=1),
        dict(ep=2, tp=2, moe=2, shared_ranks=0, k=1, h=1024, calls=2, seed=2),
        dict(ep=4, moe=6, shared_ranks=1, k=2, h=1024, removed="3", seed=3)]


@pytest.fixture(scope="module")
def traced_dir(emu_pool, tmp_path_factory):
    world = emu_pool.get(WorldSpec.of(4))
    d = str(tmp_path_factory.mktemp("trace"))
    for fields in RUNS[:2]:
        check_scenario(world, target=mp_cases.traced, run_kwargs={"directory": d}, **fields)
    # an elastic run over the survivors' own group (rank 3 idle)
    check_scenario(world, target=mp_cases.elastic, run_kwargs={"warmup": False, "directory": d}, **RUNS[2])
    return d


def test_every_send_has_a_matching_receive(traced_dir):
    events = trace_events.load(traced_dir)
    assert {e.rank for e in events} == {0, 1, 2, 3}
    assert all(e.schema == trace_events.SCHEMA_VERSION for e in events)
    transfers, mismatches = trace_events.match_transfers(events)
    assert mismatches == []
    # every (sender, peer) entry of every record is matched by the peer's record of the same collective
    assert len(transfers) == sum(len(e.group_ranks) for e in events) > 100
    for tr in transfers:
        assert (tr.receiver.group, tr.receiver.seq, tr.receiver.label()) == (tr.sender.group, tr.sender.seq,
                                                                              tr.sender.label())
        got = tr.receiver.recv_rows[tr.receiver.group_ranks.index(tr.sender.rank)]
        assert got * tr.receiver.row_bytes == tr.rows * tr.sender.row_bytes


def test_matcher_reports_a_missing_and_a_mismatched_peer(traced_dir):
    """The matcher names what does not pair: a record removed, a size changed."""
    events = trace_events.load(traced_dir)
    victim = next(e for e in events if e.rank == 1 and e.phase == "EP rows" and sum(e.recv_rows) > 0)
    src = next(r for r, n in zip(victim.group_ranks, victim.recv_rows) if n > 0 and r != 1)
    changed = [e for e in events if e is not victim]
    _, missing = trace_events.match_transfers(changed)
    assert any(m.peer == 1 and m.sender.seq == victim.seq and "no record" in m.problem for m in missing)
    victim.recv_rows[victim.group_ranks.index(src)] += 1
    _, wrong = trace_events.match_transfers(events)
    assert [(m.sender.rank, m.peer) for m in wrong] == [(src, 1)] and "expects" in wrong[0].problem


def test_sequence_numbers_contiguous_per_group(traced_dir):
    seqs = defaultdict(list)
    for e in trace_events.load(traced_dir):
        seqs[(e.rank, e.group)].append(e.seq)
    for key, s in seqs.items():
        assert s == list(range(s[0], s[0] + len(s))), key
    # the tp 2 run used EP and TP groups: dispatch EP then TP (all-gather), combine TP (reduce-scatter) then EP;
    # rows ride with the header once a group has its slot, else follow in their own exchange
    phases = {(e.op, e.phase) for e in trace_events.load(traced_dir)}
    assert {("dispatch", "TP header"), ("combine", "TP header"), ("combine", "EP rows")} <= phases
    tp = {p for p in phases if p[1].startswith("TP")}
    assert tp <= {("dispatch", "TP header"), ("dispatch", "TP all-gather"), ("combine", "TP header"),
                  ("combine", "TP reduce-scatter")}, tp
    groups = {e.group: e.group_ranks for e in trace_events.load(traced_dir)}
    assert [0, 1, 2] in groups.values()                            # the elastic survivors' group


def test_header_waits_and_times(traced_dir):
    for e in trace_events.load(traced_dir):
        assert e.t1 >= e.t0
        if e.phase.endswith("header"):
            assert len(e.wait_us) == len(e.group_ranks) and min(e.wait_us) >= 0


def test_merged_chrome_trace(traced_dir):
    path = trace.merge(traced_dir)
    data = json.load(open(path))["traceEvents"]
    slices = [e for e in data if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {0, 1, 2, 3}              # one track per rank
    assert len(slices) == len(trace_events.load(traced_dir))
    starts = {e["id"] for e in data if e["ph"] == "s"}
    ends = {e["id"] for e in data if e["ph"] == "f"}
    assert starts == ends and len(starts) > 50                     # every arrow has both ends


def test_report_script_prints_and_draws(traced_dir):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "trace_report.py"), traced_dir],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:3] == ["rank", "calls", "colls"]
    rows = report.rank_table(trace_events.load(traced_dir))
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    assert sum(r["bytes_out"] for r in rows) == sum(r["bytes_in"] for r in rows)
    for name in ("timeline.png", "traffic.png", "waits.png"):
        with open(os.path.join(traced_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
