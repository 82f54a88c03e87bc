"""Atlas A2 fullmesh on 16 real processes (EMU_SOC=A2), bit-exact against the A2 reference
(a2.md §2), its checks, and the env selection of comm_alg."""
from __future__ import annotations

import pytest

from conftest import world_fixture
from mp_check import assert_all_raise, check_scenario

world = world_fixture(16)
pytestmark = pytest.mark.timeout(300)
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
    ("dispatch", {"x": "@kw['x'][:, :1000]"}, 561002, "H"),
    ("dispatch", {"comm_alg": "fullmesh_v2"}, 561002, "comm_alg"),
    ("dispatch", {"zero_expert_num": 1}, 561002, "zero_expert_num"),
    ("dispatch", {"x_active_mask": "@torch.ones(4, 2, dtype=torch.bool)"}, 561002, "x_active_mask.dim()"),
    ("dispatch", {"quant_mode": 1}, 561002, "quant_mode"),
    ("dispatch", {"moe_expert_num": 24}, 561002, "moe_expert_num"),
    ("dispatch", {"elastic_info": "@torch.zeros(36, dtype=torch.int32)"}, 561002, "elastic_info"),
    ("dispatch", {"comm_alg": "hierarchy"}, 561002, "expert_scales"),
    ("combine", {"comm_quant_mode": 2}, 561002, "comm_quant_mode"),
    ("combine", {"ori_x": "@torch.zeros(4, 1024, dtype=torch.bfloat16)"}, 561002, "ori_x"),
])
def test_a2_errors_on_every_rank(world, op, change, code, text):
    res = world.run("mp_cases:bad_call", op=op, change=change, **A2)
    assert_all_raise(res, code, text)


def test_a2_world_usable_after_errors(world):
    check_scenario(world, **{**A2, "seed": 9})


@pytest.mark.parametrize("fields", [
    dict(),
    dict(mask="1d", seed=11),
    dict(quant=2, seed=12),
    dict(moe=32, k=4, token_nums_type=0, dtype="fp16", seed=13),
], ids=["plain", "mask-ignored", "quant-once", "L2-fp16"])
def test_a2_hierarchy_matches_reference(world, fields):
    check_scenario(world, **{**A2, "comm_alg": "hierarchy", **fields})
