"""Atlas A2 fullmesh on 16 real processes (EMU_SOC=A2), bit-exact against the A2 reference
(docs/atlas-a2.md), its checks, and the env selection of comm_alg."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu.testing.scenario import RankResult, Scenario, compare, run_reference
from mutators import derive, first_columns, widen
import mp_cases
from mp_check import assert_all_raise, check_scenario

pytestmark = [pytest.mark.emu_world(16), pytest.mark.timeout(300)]
A2 = dict(soc="A2", ep=16, shared=1, shared_ranks=0, moe=16, k=2, bs=4, h=1024, comm_alg="fullmesh")


@pytest.mark.parametrize("fields", [
    dict(),
    dict(mask="1d", seed=1),
    dict(quant=2, smooth=True, seed=2),
    dict(quant=2, mask="1d", dtype="fp16", seed=3),
    dict(moe=32, k=4, token_nums_type=0, seed=4),
    dict(uneven=True, moe=32, k=3, seed=5, comm_alg=""),
], ids=["plain", "mask1d", "quant-smooth", "quant-mask-fp16", "L2-cumsum", "uneven-env-selected"])
def test_a2_fullmesh_matches_reference(world, fields):
    check_scenario(world, **{**A2, **fields})


@pytest.mark.parametrize("op,change,code,text", [
    ("dispatch", {"x": derive(first_columns, "x", 1000)}, 561002, "H"),
    ("dispatch", {"comm_alg": "fullmesh_v2"}, 561002, "comm_alg"),
    ("dispatch", {"zero_expert_num": 1}, 561002, "zero_expert_num"),
    ("dispatch", {"x_active_mask": torch.ones(4, 2, dtype=torch.bool)}, 561002, "x_active_mask.dim()"),
    ("dispatch", {"quant_mode": 1}, 561002, "quant_mode"),
    ("dispatch", {"moe_expert_num": 24}, 561002, "moe_expert_num"),
    ("dispatch", {"elastic_info": torch.zeros(36, dtype=torch.int32)}, 561002, "elastic_info"),
    ("dispatch", {"comm_alg": "hierarchy"}, 561002, "expert_scales"),
    ("dispatch", {"expert_ids": torch.zeros(257, 2, dtype=torch.int32)}, 561002, "Bs"),
    ("dispatch", {"expert_ids": torch.zeros(4, 17, dtype=torch.int32)}, 561002, "K"),
    ("dispatch", {"scales": torch.ones(16, 1024)}, 561002, "scales"),
    ("combine", {"comm_quant_mode": 2}, 561002, "comm_quant_mode"),
    ("combine", {"ori_x": torch.zeros(4, 1024, dtype=torch.bfloat16)}, 561002, "ori_x"),
])
def test_a2_errors_on_every_rank(world, op, change, code, text):
    res = world.run(mp_cases.bad_call, op=op, change=change, **A2)
    assert_all_raise(res, code, text)


def test_a2_world_usable_after_errors(world):
    check_scenario(world, **{**A2, "seed": 9})


@pytest.mark.parametrize("fields", [
    dict(),
    dict(mask="1d", seed=11),
    dict(quant=2, seed=12),
    dict(quant=2, smooth=True, seed=14),                                  # smooth scales ignored
    dict(moe=32, k=4, token_nums_type=0, dtype="fp16", seed=13),
], ids=["plain", "mask-ignored", "quant-once", "quant-smooth-ignored", "L2-fp16"])
def test_a2_hierarchy_matches_reference(world, fields):
    check_scenario(world, **{**A2, "comm_alg": "hierarchy", **fields})


def test_a2_env_selects_hierarchy(world):
    """comm_alg "" with HCCL_INTRA_PCIE_ENABLE=1 and HCCL_INTRA_ROCE_ENABLE=0 runs hierarchy."""
    env = {"HCCL_INTRA_PCIE_ENABLE": "1", "HCCL_INTRA_ROCE_ENABLE": "0"}
    hier = {**A2, "comm_alg": "hierarchy", "seed": 21}
    got = [o.get() for o in world.run(mp_cases.scenario, env=env, **{**hier, "comm_alg": ""})]
    want = run_reference(Scenario(**hier))
    assert all(not compare(RankResult(dispatch=g[0], x_out=g[1]), w) for g, w in zip(got, want)), got[0]


@pytest.mark.parametrize("change,text", [
    ({"expert_scales": None}, "expert_scales"),
    ({"x": derive(widen, "x", 32)}, None),            # H 1056 is fine
    ({"x": torch.zeros(4, 10240, dtype=torch.bfloat16)}, None),         # H 10240: the hierarchy limit
    ({"x": torch.zeros(4, 10272, dtype=torch.bfloat16)}, "H"),
])
def test_a2_hierarchy_checks(world, change, text):
    fields = {**A2, "comm_alg": "hierarchy"}
    res = world.run(mp_cases.bad_call, op="dispatch", change={**change, "expert_scales": change.get(
        "expert_scales", torch.rand(4, 2))}, **fields)
    if text is None:
        assert [o.value for o in res] == ["ok"] * 16, res[0]
    else:
        assert_all_raise(res, 561002, text)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(alg=st.sampled_from(["fullmesh", "hierarchy"]), per_rank=st.sampled_from([1, 2]), k=st.integers(1, 4),
       bs=st.integers(1, 6), quant=st.sampled_from([0, 2]), mask=st.sampled_from(["none", "1d"]),
       dtype=st.sampled_from(["bf16", "fp16"]), seed=st.integers(0, 1000))
def test_a2_random_worlds(world, alg, per_rank, k, bs, quant, mask, dtype, seed):
    check_scenario(world, **{**A2, "comm_alg": alg, "moe": 16 * per_rank, "k": k, "bs": bs, "quant": quant,
                             "mask": mask, "dtype": dtype, "seed": seed})
