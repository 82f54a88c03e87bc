"""2 real processes: small-world corners, randomised scenarios, performance_info."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mp_cases
from mp_check import check_scenario

pytestmark = [pytest.mark.emu_world(2), pytest.mark.timeout(300)]


@pytest.mark.parametrize("fields", [
    dict(ep=2, moe=2, shared_ranks=0, k=2, bs=1, h=1024),
    dict(ep=2, moe=1, shared_ranks=1, k=1, bs=3, h=8192, quant=2, smooth=True),
    dict(ep=2, moe=8, shared_ranks=0, k=3, uneven=True, bs=5, h=1024, quant=2, token_nums_type=0),
    dict(ep=2, moe=4, shared_ranks=0, k=4, bs=512, h=1024, mask="2d"),
    dict(ep=2, moe=2, shared_ranks=0, k=2, bs=6, h=1032, comm_quant=2, dtype="fp16"),
], ids=["bs1", "shared-h8192-quant", "uneven-L4-quant", "bs512-mask2d", "comm-quant-fp16"])
def test_corner_scenarios(world, fields):
    check_scenario(world, **fields)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(moe_per_rank=st.sampled_from([1, 2, 3]), shared_ranks=st.sampled_from([0, 1]),
       k=st.integers(1, 3), bs=st.integers(1, 9), quant=st.sampled_from([0, 2]), smooth=st.booleans(),
       mask=st.sampled_from(["none", "1d", "2d"]), comm_quant=st.sampled_from([0, 2]),
       dtype=st.sampled_from(["bf16", "fp16"]), seed=st.integers(0, 10_000))
def test_random_scenarios(world, moe_per_rank, shared_ranks, k, bs, quant, smooth, mask, comm_quant, dtype, seed):
    moe = moe_per_rank * (2 - shared_ranks)
    k = min(k, moe)
    check_scenario(world, ep=2, moe=moe, shared_ranks=shared_ranks, k=k, bs=bs, h=1024, quant=quant,
                   smooth=smooth and quant == 2, mask=mask, comm_quant=comm_quant, dtype=dtype, seed=seed)


def test_performance_info_accumulates_real_waits(world):
    """Rank 1 enters 0.3 s late twice: rank 0 adds >= 0.25 s per call for source 1 to the 5 it had;
    rank 1, last to arrive, adds only the transfer for source 0 (more than nothing)."""
    perf = [o.get() for o in world.run(mp_cases.delayed_dispatch, late_rank=1, delay_s=0.3, ep=2, moe=2, shared_ranks=0,
                     k=1, bs=2, h=1024)]
    assert perf[0][1] >= 5 + 2 * 250_000, perf
    assert perf[0][0] == 5                         # a rank never waits for itself
    assert perf[1][0] < perf[0][1] and perf[1][1] == 5, perf
    assert perf[1][0] > 5, perf                    # the last to arrive still waits for the data to cross
