"""combine_add_rms_norm (torch_npu 2.14): a MoE layer through dispatch_v2 -> experts ->
combine_add_rms_norm on 4 and 8 ranks equals a dense layer bit for bit (combine's fp32 sum,
+ residual_x, RMSNorm in the kernel's rounding order), and its own checks fail on every rank."""
from __future__ import annotations

import pytest
import torch

import mp_cases
from emu.testing import WorldSpec
from mp_check import assert_all_raise
from mutators import cast, derive, first_rows, squeeze_middle

pytestmark = pytest.mark.timeout(300)
CASES = [dict(seed=1), dict(shared_ranks=1, quant=2, seed=2), dict(shared_ranks=2, quant=2, mask=True, seed=3),
         dict(shared_ranks=1, comm_quant=2, seed=4)]


@pytest.mark.parametrize("size", [4, 8])
def test_layer_matches_dense_bit_for_bit(emu_pool, size):
    world = emu_pool.get(WorldSpec.of(size))
    for case in CASES:
        assert [o.get() for o in world.run(mp_cases.add_rms_norm_layer, **case)] == [[True] * 3] * size, case


BAD = [
    ("gamma", derive(cast, "gamma", torch.float16), 161002, "gamma.dtype"),
    ("expand_x", derive(cast, "expand_x", torch.float16), 161002, "expand_x.dtype"),
    ("residual_x", derive(first_rows, "residual_x", 3), 561002, "residual_x.shape"),
    ("residual_x", derive(squeeze_middle, "residual_x"), 561002, "residual_x.dim()"),
    ("gamma", derive(first_rows, "gamma", 1000), 561002, "gamma.shape[0]"),
    ("activation_scale", torch.ones(4), 561002, "activation_scale"),
    ("group_list", torch.ones(1, dtype=torch.int64), 561002, "group_list"),
]


@pytest.mark.parametrize("name,value,code,text", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_input_fails_on_every_rank(emu_pool, name, value, code, text):
    """One rank's bad input: it raises the operator's class, every other rank a PeerError naming it."""
    world = emu_pool.get(WorldSpec.of(4))
    res = world.run(mp_cases.bad_call, "combine_add_rms_norm", {name: value}, bad_ranks=[2], ep=4, moe=6,
                    shared_ranks=1, k=2)
    assert_all_raise(res, code, text, bad_ranks=[2])


def test_tp_2_and_atlas_a2_are_rejected(emu_pool):
    world = emu_pool.get(WorldSpec.of(4))
    res = world.run(mp_cases.bad_call, "combine_add_rms_norm", {"tp_world_size": 2}, ep=4, moe=3, shared_ranks=1, k=2)
    assert_all_raise(res, 561002, "combine_add_rms_norm has no TP")
    res = world.run(mp_cases.bad_call, "combine_add_rms_norm", {}, None, {"EMU_SOC": "A2"}, ep=4, moe=4,
                    shared_ranks=0, k=2)        # positional: World.run's own env= would set it for dispatch too
    assert_all_raise(res, 161002, "runs on Atlas A3 only")
