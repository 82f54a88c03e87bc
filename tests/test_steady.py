"""The steady path (emu.a3.steady) on 2 real processes.

A call like one that succeeded before skips the checks that depend only on its signature and
plans its rows directly; everything on the wire is as on the general path.  So: every rank is
bit-exact with the reference whichever ranks take it, bad input on a steady call raises what
it raises on the general path (the bad rank falls back, its peers learn of it in the header),
and only the common form (no elastic table, masks at most 1-D) takes it.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mp_cases
from emu.core.errors import ErrorKind
from emu.testing.scenario import RankResult, Scenario, compare, make_rank_data, run_reference
from mp_check import assert_all_raise, check_scenario
from mutators import add, cast, derive, first_slot_id, first_slot_twice

pytestmark = [pytest.mark.emu_world(2), pytest.mark.timeout(300)]

NULL, TILING = 161001, 561002
BASE = dict(ep=2, moe=4, shared_ranks=0, k=2, bs=4, h=1024)


def _check_steady_run(world, fields: dict, fast: list[int]) -> None:
    """Run the scenario ``fields`` with the steady path allowed on ``fast``: every rank bit-exact
    with the reference; from the second round on, a fast rank with an active token took the steady
    path for each call (4 of its 6 op calls at least), the others never."""
    got = world.run(mp_cases.steady, fast_ranks=fast, **fields)
    sc = Scenario(**fields)
    want = run_reference(sc)
    for g, res in enumerate(got):
        (dispatch, x_out, _), n = res.get()
        assert not compare(RankResult(dispatch=dispatch, x_out=x_out), want[g]), (g, fields)
        m = make_rank_data(sc, g).dispatch.x_active_mask
        steady = g in fast and (m is None or bool(m.any()))
        assert (n >= 4) if steady else (n == 0), (g, n, fast)


@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))
@given(moe_per_rank=st.sampled_from([1, 2, 3]), k=st.integers(1, 3), bs=st.integers(1, 9),
       quant=st.sampled_from([0, 2]), smooth=st.booleans(), comm_quant=st.sampled_from([0, 2]),
       dtype=st.sampled_from(["bf16", "fp16"]), mask=st.sampled_from(["none", "1d"]),
       shared_ranks=st.sampled_from([0, 1]), fast=st.sampled_from([[0, 1], [0], [1], []]),
       seed=st.integers(0, 10_000))
def test_steady_calls_are_bit_exact_whoever_takes_them(world, moe_per_rank, k, bs, quant, smooth, comm_quant, dtype,
                                                       mask, shared_ranks, fast, seed):
    """Three round trips of one signature: from the second on, the ranks allowed to take the steady
    path take it (the others the general one; a rank with no active token always does), and
    every rank is bit-exact with the reference."""
    moe = (2 - shared_ranks) * moe_per_rank
    fields = dict(ep=2, moe=moe, shared_ranks=shared_ranks, k=min(k, moe), bs=bs, h=1024,
                  quant=quant, smooth=smooth and quant == 2, comm_quant=comm_quant, dtype=dtype, mask=mask, seed=seed,
                  calls=3)
    _check_steady_run(world, fields, fast)


@pytest.mark.parametrize("fields", [
    dict(BASE, shared_ranks=1, moe=2, k=2), dict(BASE, shared_ranks=1, moe=3, k=2, quant=2, smooth=True, mask="1d",
                                                  comm_quant=2, seed=9),
    dict(BASE, zero=1, copy=1, const=2, special_frac=0.4, seed=11),
    dict(BASE, shared_ranks=1, moe=2, copy=2, special_frac=0.4, mask="1d", seed=12),
], ids=["shared-rank", "shared-rank-quant-mask", "special-experts", "shared-rank-copy-experts-mask"])
def test_shared_and_special_experts_take_the_steady_path(world, fields):
    """Shared-expert ranks and zero / copy / const experts: steady from the second round on every
    rank with an active token, bit-exact."""
    fields = dict(fields, calls=3)
    _check_steady_run(world, fields, [0, 1])


@pytest.mark.parametrize("fields", [
    dict(BASE, mask="2d"), dict(BASE, elastic_flag0=True),
], ids=["mask-2d", "elastic-table"])
def test_only_the_common_form_takes_the_steady_path(world, fields):
    res = world.run(mp_cases.steady, fast_ranks=[0, 1], calls=3, **fields)
    assert [r.get()[1] for r in res] == [0, 0], fields


# name: (op, change on rank 1, code, text in rank 1's message, kind of rank 1's error)
STEADY_ERRORS = {
    "id-out-of-range": ("dispatch", {"expert_ids": derive(first_slot_id, 4)}, TILING, "expert_ids[", None),
    "id-negative": ("dispatch", {"expert_ids": derive(first_slot_id, -1)}, TILING, "expert_ids[", None),
    "duplicate-ids": ("dispatch", {"expert_ids": derive(first_slot_twice)}, TILING, "same MoE expert", None),
    "x-null": ("dispatch", {"x": None}, NULL, "x=None", None),
    "ids-int64": ("dispatch", {"expert_ids": derive(cast, "expert_ids", torch.int64)}, 161002, "expert_ids.dtype",
                  None),
    "quant-mismatch": ("dispatch", {"quant_mode": 2}, TILING, "quant_mode", ErrorKind.MISMATCHED_ATTRIBUTE),
    "send-counts-beyond-A": ("combine", {"ep_send_counts": derive(add, "ep_send_counts", 1000)}, TILING,
                             "ep_send_counts[", None),
    "assist-not-triples": ("combine", {"assist_info_for_combine": derive(add, "assist_info_for_combine", 100)},
                           TILING, "assist_info_for_combine[", None),
}


def _seen(res) -> list[tuple]:
    """What each rank raised, call numbers aside."""
    return [(r.error.type_name, r.error.code, r.error.kind, r.error.culprits, re.sub(r"#\d+", "#n", r.error.message))
            if r.error is not None else ("returned", r.value) for r in res]


@pytest.mark.parametrize("name", list(STEADY_ERRORS))
def test_bad_input_on_a_steady_call_raises_as_on_the_general_path(world, name):
    """After two good round trips, rank 1 passes bad input: it falls back to the general path and
    raises its error; rank 0, on the steady path, learns of it in the header and raises the
    peer's error: class, code, kind, blame and message as when both take the general path.
    Then the world runs the scenario bit-exactly again."""
    op, change, code, text, kind = STEADY_ERRORS[name]
    general = world.run(mp_cases.warmed, target="bad_call", fields=BASE, fast=False, op=op, change=change,
                        bad_ranks=[1])
    res = world.run(mp_cases.warmed, target="bad_call", fields=BASE, op=op, change=change, bad_ranks=[1])
    steady = [r.get() for r in world.run(mp_cases.steady_since_warm)]
    if kind is None:
        assert_all_raise(res, code, text, bad_ranks=[1])
    else:
        assert_all_raise(res, code, text, bad_ranks=None, kind=kind)       # 2 ranks: no majority to blame by
    assert _seen(res) == _seen(general)
    # the good rank's call of ``op`` (and a combine's dispatch before it) were steady; the bad rank's were not
    assert steady == ([1, 0] if op == "dispatch" else [2, 1]), steady
    check_scenario(world, calls=2, **BASE)


def test_mismatched_calls_on_the_steady_path(world):
    """After warming up, rank 1 dispatches again while rank 0 combines (both steady): both raise
    the verdict they raise on the general path (2 ranks: no majority, both blamed)."""
    general = world.run(mp_cases.warmed, target="mismatched_calls", fields=BASE, fast=False, odd_rank=1)
    res = world.run(mp_cases.warmed, target="mismatched_calls", fields=BASE, odd_rank=1)
    steady = [r.get() for r in world.run(mp_cases.steady_since_warm)]
    assert_all_raise(res, TILING, "mismatched calls", kind=ErrorKind.MISMATCHED_CALL, culprits=(0, 1))
    assert _seen(res) == _seen(general)
    assert steady == [2, 2], steady
    check_scenario(world, calls=2, **BASE)


def test_a_chip_change_leaves_the_steady_path(world):
    """A3 calls leave a steady state; the same calls with EMU_SOC=A2 are A2's: its tiling rejects
    2 ranks (A2 wants a multiple of 8) on every rank, where A3's steady path would have run them."""
    res = world.run(mp_cases.steady, fast_ranks=[0, 1], calls=3, **BASE)
    assert all(r.get()[1] >= 4 for r in res)
    res = world.run(mp_cases.steady, fast_ranks=[0, 1], soc="A2", calls=2, **BASE)
    assert_all_raise(res, TILING, "ep_world_size", bad_ranks=None)
    assert all("(A2)" in r.error.message for r in res)
    check_scenario(world, calls=2, **BASE)


def test_a_mask_that_is_not_a_prefix_takes_the_general_path_and_warns(world):
    """A 1-D x_active_mask with a True after a False: the kernel counts its True values as a prefix;
    the steady path leaves it to the general one, which warns (on every call), and stays exact."""
    res = world.run(mp_cases.gappy_mask_calls, calls=3, **BASE)
    for r in res:
        warned, n, exact = r.get()
        assert warned == 3 and n == 0 and exact, (warned, n, exact)


@pytest.mark.parametrize("fields", [BASE, dict(BASE, mask="1d", quant=2, seed=5)], ids=["plain", "mask-quant"])
def test_v1_calls_take_the_steady_path_too(world, fields):
    """V1 dispatch and combine (rows back by position) of one signature: from the second round on
    all four op calls (V2 and V1 of each) are steady, and V1 still gives V2's outputs (which the
    other tests hold to the reference)."""
    res = [r.get() for r in world.run(mp_cases.steady_v1, calls=3, **fields)]
    assert all(same for same, _ in res), res
    active = [make_rank_data(Scenario(**fields), g).dispatch.x_active_mask for g in range(2)]
    assert all(n >= 8 or (m is not None and not m.any()) for (_, n), m in zip(res, active)), res


@pytest.mark.parametrize("case", [dict(), dict(quant=2, comm_quant=2, seed=3)], ids=["plain", "quant"])
def test_combine_add_rms_norm_takes_the_steady_path(world, case):
    """dispatch_v2 + combine_add_rms_norm, three times: steady from the second on, every output
    bit-exact against a dense layer each time."""
    res = [r.get() for r in world.run(mp_cases.steady_add_rms_norm, calls=3, **case)]
    assert all(checks == [[True] * 3] * 3 for checks, _ in res), res
    assert all(n >= 4 for _, n in res), res


TP2 = dict(ep=2, tp=2, moe=2, shared_ranks=0, k=1, bs=5, h=1024)


@pytest.mark.emu_world(4)
@pytest.mark.parametrize("fields,fast", [
    (TP2, [0, 1, 2, 3]), (dict(TP2, quant=2, mask="1d", seed=2), [0, 3]), (dict(TP2, dtype="fp16", seed=4), [1, 2]),
], ids=["all", "quant-mask-some", "fp16-others"])
def test_tp2_calls_take_the_steady_path(world, fields, fast):
    """With tp_world_size 2 (EP 2 x TP 2) the steady path keeps the TP domain too: TP all-gather and
    reduce-scatter as on the general path, every rank bit-exact, whichever ranks take it."""
    fields = dict(fields, calls=3)
    _check_steady_run(world, fields, fast)


@pytest.mark.emu_world(4)
@pytest.mark.parametrize("op,change", [
    ("combine", {"tp_send_counts": derive(add, "tp_send_counts", 1)}),
    ("dispatch", {"expert_ids": derive(first_slot_id, 2)}),
], ids=["tp-send-counts", "id-out-of-range"])
def test_bad_input_on_a_steady_tp2_call_raises_as_on_the_general_path(world, op, change):
    """TP 2: rank 1's bad input after warming up raises on every rank what the general path raises."""
    general = world.run(mp_cases.warmed, target="bad_call", fields=TP2, fast=False, op=op, change=change,
                        bad_ranks=[1])
    res = world.run(mp_cases.warmed, target="bad_call", fields=TP2, op=op, change=change, bad_ranks=[1])
    steady = [r.get() for r in world.run(mp_cases.steady_since_warm)]
    assert all(r.error is not None and r.error.code == TILING for r in res), _seen(res)
    assert _seen(res) == _seen(general)
    # a bad id fails rank 1's data checks (general path); bad tp_send_counts pass them (values the TP
    # header cross-checks), so every rank's combine is steady and the TP exchange finds it
    assert steady == ([2, 2, 2, 2] if op == "combine" else [1, 0, 1, 1]), steady
    check_scenario(world, calls=2, **TP2)


def test_the_phase_cost_tool_sees_every_steady_phase_and_puts_them_back(world):
    """scripts/phase_cost.py: each round trip is one steady dispatch and one steady combine, two
    EP exchanges with two collectives; the library's functions are the originals afterwards."""
    for res in world.run(mp_cases.phase_table):
        seen, positive, back = res.get()
        assert seen["a3.steady.dispatch"] == seen["a3.steady.combine"] == 1.0, seen
        assert seen["comm.call.Call.exchange"] == seen["comm.transport.issue"] == 2.0, seen
        assert seen["chips.run"] == 2.0 and positive and back, (seen, positive, back)
