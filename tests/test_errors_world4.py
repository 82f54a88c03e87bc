"""Bad input on 4 real processes: the operator's error class on every rank, never a hang,
and the world still usable afterwards (docs/errors.md)."""
from __future__ import annotations

import os

import pytest
import torch

from emu.core.errors import ErrorKind
from mutators import (add, cast, derive, elastic_field, elastic_tables, extra_dim, first_columns, first_rows,
                      first_slot_id, first_slot_twice, widen)
import mp_cases
from mp_check import assert_all_raise, check_scenario
from emu.testing import Fault

pytestmark = [pytest.mark.emu_world(4), pytest.mark.timeout(300)]

NULL, INVALID, TILING = 161001, 161002, 561002
BASE = dict(ep=4, moe=6, shared_ranks=1, k=2, bs=4, h=1024)

# name: (op, change, code, text in the bad rank's message, extra scenario fields)
DISPATCH = {
    "x-null": ({"x": None}, NULL, "x=None", {}),
    "ids-null": ({"expert_ids": None}, NULL, "expert_ids=None", {}),
    "group-ep-long": ({"group_ep": "g" * 130}, NULL, "group_ep", {}),
    "x-fp32": ({"x": derive(cast, "x", torch.float32)}, INVALID, "x.dtype", {}),
    "ids-int64": ({"expert_ids": derive(cast, "expert_ids", torch.int64)}, INVALID, "expert_ids.dtype", {}),
    "mask-int8": ({"x_active_mask": torch.ones(4, dtype=torch.int8)}, INVALID, "x_active_mask.dtype", {}),
    "scales-fp16": ({"scales": derive(cast, "scales", torch.float16)}, INVALID, "scales.dtype", dict(quant=2, smooth=True)),
    "ep-size-1": ({"ep_world_size": 1}, TILING, "ep_world_size", {}),
    "tp-size-3": ({"tp_world_size": 3}, TILING, "tp_world_size", {}),
    "ep-rank-range": ({"ep_rank_id": 4}, TILING, "ep_rank_id", {}),
    "tp-rank-nonzero": ({"tp_rank_id": 1}, TILING, "tp_rank_id", {}),
    "shard-type": ({"expert_shard_type": 1}, TILING, "expert_shard_type", {}),
    "shared-num-5": ({"shared_expert_num": 5}, TILING, "shared_expert_num", {}),
    "moe-zero": ({"moe_expert_num": 0}, TILING, "moe_expert_num", {}),
    "quant-static": ({"quant_mode": 1}, TILING, "quant_mode", {}),
    "quant-3": ({"quant_mode": 3}, TILING, "quant_mode", {}),
    "token-nums-type-2": ({"expert_token_nums_type": 2}, TILING, "expert_token_nums_type", {}),
    "zero-negative": ({"zero_expert_num": -1}, TILING, "zero_expert_num", {}),
    "comm-alg": ({"comm_alg": "ring"}, TILING, "comm_alg", {}),
    "scales-with-quant0": ({"scales": torch.ones(7, 1024)}, TILING, "scales", {}),
    "x-3d": ({"x": derive(extra_dim, "x")}, TILING, "x.dim()", {}),
    "mask-shape": ({"x_active_mask": torch.ones(3, dtype=torch.bool)}, TILING, "x_active_mask.shape[0]", {}),
    "shared-rank-num-not-multiple": ({"shared_expert_num": 2}, TILING, "shared_expert_rank_num", {}),
    "moe-not-multiple": ({"moe_expert_num": 7}, TILING, "moe_expert_num", {}),
    "global-bs-not-multiple": ({"global_bs": 18}, TILING, "global_bs", {}),
    "mask-with-larger-global-bs": ({"global_bs": 32, "x_active_mask": torch.ones(4, dtype=torch.bool)},
                                   TILING, "x_active_mask", {}),
    "h-too-small": ({"x": derive(first_columns, "x", 512)}, TILING, "H", {}),
    "k-too-large": ({"expert_ids": torch.zeros(4, 7, dtype=torch.int32)}, TILING, "K", {}),
    "scales-shape": ({"scales": derive(first_columns, "scales", 8)}, TILING, "scales.shape", dict(quant=2, smooth=True)),
    "window-too-small": ({}, TILING, "HCCL_BUFFSIZE", {"env": {"HCCL_BUFFSIZE": "0"}}),
    "id-out-of-range": ({"expert_ids": derive(first_slot_id, 6)},
                        TILING, "expert_ids[", {}),
    "id-negative": ({"expert_ids": derive(first_slot_id, -1)}, TILING, "expert_ids[", {}),
    "duplicate-ids": ({"expert_ids": derive(first_slot_twice)}, TILING, "same MoE expert", {}),
    "unknown-group": ({"group_ep": "no_such_group"}, TILING, "group_ep", {}),
    "ep-size-vs-group": ({"ep_world_size": 8, "moe_expert_num": 7}, TILING, "ep_world_size", {}),
    # torch_npu 2.14's dtype keywords (codes: 1 int8, 5 fp16, 6 fp32, 15 bf16, 24 fp8 e4m3)
    "y-dtype-fp8": ({"y_dtype": 24}, INVALID, "y_dtype", {}),
    "y-dtype-fp16-for-bf16-x": ({"y_dtype": torch.float16}, INVALID, "y_dtype", {}),
    "y-dtype-int8-quant0": ({"y_dtype": 1}, TILING, "y_dtype", {}),
    "y-dtype-bf16-quant2": ({"y_dtype": 15}, TILING, "y_dtype", dict(quant=2)),
    "x-dtype-fp32": ({"x_dtype": 6}, INVALID, "x_dtype", {}),
    "x-dtype-unknown": ({"x_dtype": 293}, INVALID, "x_dtype", {}),
    "scales-dtype-bf16": ({"scales_dtype": 15}, INVALID, "scales_dtype", dict(quant=2, smooth=True)),
    # torch_npu sizes ep_recv_counts W*L + 2*G*K*(W//8) with expert_scales: W = 4 has no room for tp 2's x2
    "expert-scales-with-tp2": ({"expert_scales": torch.ones(4, 2)}, TILING, "ep_recv_counts.shape[0]",
                               dict(tp=2, ep=2, moe=2, shared_ranks=0)),
}
COMBINE = {
    "expand-x-null": ({"expand_x": None}, NULL, "expand_x=None", {}),
    "scales-null": ({"expert_scales": None}, NULL, "expert_scales=None", {}),
    "group-ep-long": ({"group_ep": "g" * 130}, INVALID, "group_ep", {}),
    "expand-x-fp32": ({"expand_x": derive(cast, "expand_x", torch.float32)}, INVALID, "expand_x.dtype", {}),
    "expert-scales-fp16": ({"expert_scales": derive(cast, "expert_scales", torch.float16)}, INVALID, "expert_scales.dtype", {}),
    "comm-quant-1": ({"comm_quant_mode": 1}, TILING, "comm_quant_mode", {}),
    "expert-scales-shape": ({"expert_scales": derive(first_columns, "expert_scales", 1)}, TILING, "expert_scales.shape", {}),
    "assist-too-short": ({"assist_info_for_combine": derive(first_rows, "assist_info_for_combine", 10)}, TILING,
                         "assist_info_for_combine.shape[0]", {}),
    "shared-x-with-shared-ranks": ({"shared_expert_x": torch.zeros(4, 1024, dtype=torch.bfloat16)}, TILING,
                                   "shared_expert_x", {}),
    "copy-needs-ori-x": ({"ori_x": None}, TILING, "ori_x", dict(copy=1)),
    "ori-x-dtype": ({"ori_x": derive(cast, "ori_x", torch.float16)}, TILING, "ori_x.dtype", dict(copy=1)),
    "const-v-shape": ({"const_expert_v": derive(first_columns, "const_expert_v", 8)}, TILING, "const_expert_v.shape",
                      dict(const=1)),
    "counts-beyond-capacity": ({"ep_send_counts": derive(add, "ep_send_counts", 1000)}, TILING, "ep_send_counts", {}),
    "tp-send-counts-2-with-tp1": ({"tp_send_counts": torch.empty(2), "tp_world_size": 1}, TILING,
                                  "tp_send_counts.shape[0]", {}),
}


def _fields(extra: dict) -> tuple[dict, dict | None]:
    extra = dict(extra)
    env = extra.pop("env", None)
    return {**BASE, **extra}, env


@pytest.mark.parametrize("name", list(DISPATCH))
def test_dispatch_error_on_every_rank(world, name):
    change, code, text, extra = DISPATCH[name]
    fields, env = _fields(extra)
    assert_all_raise(world.run(mp_cases.bad_call, op="dispatch", change=change, env=env, **fields), code, text)


@pytest.mark.parametrize("name", list(COMBINE))
def test_combine_error_on_every_rank(world, name):
    change, code, text, extra = COMBINE[name]
    fields, env = _fields(extra)
    assert_all_raise(world.run(mp_cases.bad_call, op="combine", change=change, env=env, **fields), code, text)


@pytest.mark.parametrize("op,change,code,text", [
    ("dispatch", {"x": None}, NULL, "x=None"),
    ("dispatch", {"quant_mode": 1}, TILING, "quant_mode"),
    ("combine", {"expert_scales": derive(cast, "expert_scales", torch.float16)}, INVALID, "expert_scales.dtype"),
])
def test_one_bad_rank_fails_every_rank(world, op, change, code, text):
    """Only rank 2 gets bad input: it raises its own error, the others a PeerError naming it."""
    res = world.run(mp_cases.bad_call, op=op, change=change, bad_ranks=[2], **BASE)
    assert_all_raise(res, code, text, bad_ranks=[2])


@pytest.mark.parametrize("op,change,attribute", [
    ("dispatch", {"quant_mode": 2}, "quant_mode"),
    ("dispatch", {"moe_expert_num": 9}, "moe_expert_num"),
    ("dispatch", {"x": derive(cast, "x", torch.float16)}, "activation dtype"),
    ("dispatch", {"x": derive(widen, "x", 8)}, "H (hidden size)"),
    ("dispatch", {"global_bs": 32}, "global_bs"),
    ("dispatch", {"expert_ids": derive(first_columns, "expert_ids", 1)}, "K (expert_ids.shape[1])"),
    ("dispatch", {"shared_expert_rank_num": 2}, "shared_expert_rank_num"),
    ("combine", {"comm_quant_mode": 2}, "comm_quant_mode"),
    ("combine", {"zero_expert_num": 1}, "zero_expert_num"),
])
def test_attribute_mismatch_names_the_attribute(world, op, change, attribute):
    """Rank 1 passes a different (but locally valid) attribute: every rank raises, naming it
    and which ranks passed what."""
    res = world.run(mp_cases.bad_call, op=op, change=change, bad_ranks=[1], **BASE)
    assert_all_raise(res, TILING, attribute, bad_ranks=None, kind=ErrorKind.MISMATCHED_ATTRIBUTE, culprits=(1,))
    assert all(f"attribute {attribute}" in r.error.message and "rank 1 passed" in r.error.message for r in res), res[0]


def test_mismatched_call_sequence(world):
    res = world.run(mp_cases.mismatched_calls, odd_rank=3, **BASE)
    assert_all_raise(res, TILING, "mismatched calls", kind=ErrorKind.MISMATCHED_CALL, culprits=(3,))
    assert all("rank 3 called dispatch" in r.error.message for r in res)


def test_world_usable_after_errors(world):
    check_scenario(world, **BASE, seed=3)
    check_scenario(world, ep=2, tp=2, moe=2, shared_ranks=0, k=1, h=1024, quant=2, seed=4)


def test_tp2_bad_rank_fails_both_domains(world):
    """tp 2 (ep 2 x tp 2): a bad rank's EP and TP peers all raise; no rank hangs."""
    fields = dict(ep=2, tp=2, moe=2, shared_ranks=0, k=1, h=1024)
    res = world.run(mp_cases.bad_call, op="dispatch", change={"x": None}, bad_ranks=[0], **fields)
    assert_all_raise(res, NULL, "x=None", bad_ranks=[0])
    res = world.run(mp_cases.bad_call, op="combine", change={"tp_send_counts": None}, bad_ranks=[3], **fields)
    assert_all_raise(res, TILING, "tp_send_counts", bad_ranks=[3])
    check_scenario(world, **fields, seed=5)


ELASTIC_BASE = dict(ep=4, moe=6, shared_ranks=1, k=2, bs=4, h=1024, removed="2")   # survivors 0, 1, 3


def _survivors(res):
    return [r for g, r in enumerate(res) if g != 2]


@pytest.mark.parametrize("change,code,text", [
    ({"elastic_info": derive(first_rows, "elastic_info", -1)}, TILING, "elastic_info.shape[0]"),
    ({"elastic_info": derive(cast, "elastic_info", torch.int64)}, INVALID, "elastic_info.dtype"),
    ({"elastic_info": derive(elastic_tables, [1, 0, 3, -1])},
     TILING, "inverse permutations"),
    ({"elastic_info": derive(elastic_field, 3, 5)}, TILING, "E'"),
    # E' = 4 < E = 6: id 5 is dropped by dispatch but awaited by combine
    ({"expert_ids": derive(first_slot_id, 5)}, TILING, "[E'="),
])
def test_elastic_errors_on_every_survivor(world, change, code, text):
    res = world.run(mp_cases.bad_call, op="dispatch", change=change, **ELASTIC_BASE)
    assert res[2].value == "idle"
    assert_all_raise(_survivors(res), code, text)


def test_elastic_removed_rank_calling_is_rejected(world):
    """Rank 2 is removed by the table but calls anyway: it raises on its own, naming the rule."""
    res = world.run(mp_cases.bad_call, op="dispatch", change={}, callers=[2], **ELASTIC_BASE)
    assert_all_raise([res[2]], TILING, "removed ranks must not call")
    assert res[0].value == res[1].value == res[3].value == "idle"


def test_elastic_with_tp2_rejected(world):
    res = world.run(mp_cases.bad_call, op="dispatch", callers=[0, 1, 2, 3],
                    change={"elastic_info": torch.tensor([1, 2, 0, 2, 0, 1, 0, 1], dtype=torch.int32)},
                    ep=2, tp=2, moe=2, shared_ranks=0, k=1, h=1024)
    assert_all_raise(res, TILING, "elastic_info")


def test_elastic_combine_error_on_every_survivor(world):
    res = world.run(mp_cases.bad_call, op="combine",
                    change={"expert_scales": derive(first_columns, "expert_scales", 1)}, **ELASTIC_BASE)
    assert_all_raise(_survivors(res), TILING, "expert_scales.shape")
    check_scenario(world, target=mp_cases.elastic, run_kwargs={"warmup": False}, **ELASTIC_BASE, seed=9)


# ----------------------------------------------------------------------------- one bad rank, then the next call

TP2 = dict(ep=2, tp=2, moe=2, shared_ranks=0, k=1, h=1024)


def _raised_promptly(res) -> None:
    """No rank waited out EMU_TIMEOUT_S for a peer that already knew it would not come."""
    limit = float(os.environ.get("EMU_TIMEOUT_S", "30"))
    assert all(r.seconds < limit / 2 for r in res), [(r.rank, round(r.seconds, 2)) for r in res]


def _then_next_call_works(world, **fields) -> None:
    """The same groups serve the next valid call on every rank (call numbers in step, no group left
    with a collective in flight)."""
    if "removed" in fields:
        check_scenario(world, target=mp_cases.elastic, run_kwargs={"warmup": False}, **fields, seed=9)
    else:
        check_scenario(world, **fields, seed=3)


@pytest.mark.parametrize("op,name", [("dispatch", n) for n in DISPATCH] + [("combine", n) for n in COMBINE])
def test_one_bad_rank_every_rank_gets_its_error_and_the_world_goes_on(world, op, name):
    """Only rank 1 gets the bad input, whatever it is and wherever it is detected (arguments, the
    group name, the attributes, the data): it raises its own error, every peer a PeerError with
    that code naming it, at once; the next valid call works."""
    change, code, text, extra = (DISPATCH if op == "dispatch" else COMBINE)[name]
    fields, env = _fields(extra)
    res = world.run(mp_cases.bad_call, op=op, change=change, bad_ranks=[1], bad_env=env, **fields)
    assert_all_raise(res, code, text, bad_ranks=[1])
    _raised_promptly(res)
    _then_next_call_works(world, **BASE)


ONE_BAD_RANK = {
    # the elastic table of one survivor: a dtype the kernel rejects, one entry short (no domain can be read
    # from it: the peers learn of it from its farewell), tables that disagree, a wrong E'
    "elastic-int64": ("dispatch", {"elastic_info": derive(cast, "elastic_info", torch.int64)}, INVALID,
                      "elastic_info.dtype", ELASTIC_BASE),
    "elastic-short": ("dispatch", {"elastic_info": derive(first_rows, "elastic_info", -1)}, TILING,
                      "elastic_info.shape[0]", ELASTIC_BASE),
    "elastic-tables": ("dispatch", {"elastic_info": derive(elastic_tables, [1, 0, 3, -1])}, TILING,
                       "inverse permutations", ELASTIC_BASE),
    "elastic-group-long": ("dispatch", {"group_ep": "g" * 130}, NULL, "group_ep", ELASTIC_BASE),
    "elastic-combine-shared-ranks-eq-ep": ("combine", {"shared_expert_rank_num": 4}, TILING, "shared_expert_rank_num",
                                           ELASTIC_BASE),
    # with elastic_info every rank may take either role: combine wants max(W, W*L) * tp entries
    "elastic-combine-short-counts": ("combine", {"ep_send_counts": derive(first_rows, "ep_send_counts", 3)}, TILING,
                                     "ep_send_counts.shape[0]", ELASTIC_BASE),
    # tp 2 (ep 2 x tp 2): the TP peer, in another EP group, hears it through the TP exchange
    "tp2-tp-size-3": ("dispatch", {"tp_world_size": 3}, TILING, "tp_world_size", TP2),
    "tp2-group-tp-long": ("dispatch", {"group_tp": "g" * 130}, NULL, "group_tp", TP2),
    "tp2-group-tp-unknown": ("dispatch", {"group_tp": "no_such_group"}, TILING, "group_tp", TP2),
}


@pytest.mark.parametrize("name", list(ONE_BAD_RANK))
def test_one_bad_rank_elastic_and_tp2(world, name):
    op, change, code, text, fields = ONE_BAD_RANK[name]
    res = world.run(mp_cases.bad_call, op=op, change=change, bad_ranks=[1], **fields)
    callers = _survivors(res) if "removed" in fields else res
    assert_all_raise(callers, code, text, bad_ranks=[1])
    _raised_promptly(callers)
    _then_next_call_works(world, **fields)


@pytest.mark.parametrize("op,change", [("dispatch", {"x": derive(widen, "x", 8)}),
                                       ("combine", {"expand_x": derive(widen, "expand_x", 8)})])
def test_tp2_mismatch_blames_the_odd_ranks_on_every_rank(world, op, change):
    """ep 2 x tp 2, rank 1 passes another H: its own group finds the mismatch, and the ranks that
    hear of it through the other domain get the same verdict (kind and culprits), not a peer's
    "rejected input"."""
    res = world.run(mp_cases.bad_call, op=op, change=change, bad_ranks=[1], **TP2)
    culprits = {r.error.culprits for r in res}
    assert len(culprits) == 1 and 1 in culprits.pop(), [(r.rank, r.error.culprits) for r in res]
    assert_all_raise(res, TILING, "H (hidden size)", bad_ranks=None, kind=ErrorKind.MISMATCHED_ATTRIBUTE)
    _then_next_call_works(world, **TP2)


def test_a_timed_out_group_is_rebuilt_and_serves_the_next_calls(world):
    """Rank 2 comes 2.5 s late where EMU_TIMEOUT_S is 1: the others time out, then rank 2; the group
    every rank abandoned is rebuilt, and the next calls work on every rank."""
    res = world.run(mp_cases.scenario, env={"EMU_TIMEOUT_S": "1"}, faults=[Fault.delay(2, "dispatch:EP header", 2.5)],
                    **BASE)
    assert all(r.error is not None and r.error.kind == ErrorKind.TIMEOUT for r in res), res
    assert [r.error.culprits for r in res if r.rank != 2] == [(2,)] * 3
    for _ in range(2):
        _then_next_call_works(world, **BASE)
