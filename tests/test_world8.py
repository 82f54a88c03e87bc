"""8 real processes: the operator's configurations, bit-exact against the reference."""
from __future__ import annotations

import pytest
import torch

from emu.core.errors import ErrorKind
import mp_cases
from mutators import cast, derive, first_rows
from mp_check import assert_all_raise, check_scenario
from emu.testing.scenario import RankResult, Scenario, compare, run_reference

pytestmark = [pytest.mark.emu_world(8), pytest.mark.timeout(300)]

H = 1024
CASES = {
    "seed-scenario-h7168": dict(),
    "tp0-no-shared-K4": dict(tp=0, shared_ranks=0, moe=16, k=4, h=H),
    "tp1-one-shared-mask1d": dict(tp=1, mask="1d", h=H, seed=1),
    "shared-replicas-R2": dict(shared=1, shared_ranks=2, moe=12, h=H, seed=2),
    "two-shared-experts-R2": dict(shared=2, shared_ranks=4, moe=8, k=2, h=H, seed=3),
    "L2-count": dict(moe=14, k=4, h=H, seed=4),
    "L4-cumsum": dict(moe=28, k=6, token_nums_type=0, h=H, seed=5),
    "quant2-no-smooth": dict(quant=2, h=H, seed=6),
    "quant2-smooth-mask2d": dict(quant=2, smooth=True, mask="2d", moe=14, h=H, seed=7),
    "comm-quant2-fp16": dict(comm_quant=2, dtype="fp16", h=H, seed=8),
    "uneven-bs-global-bs": dict(uneven=True, moe=14, h=H, seed=9),
    "global-bs-larger": dict(global_bs=128, shared_ranks=0, moe=8, h=H, seed=10),
    "shared-expert-x": dict(shared_ranks=0, moe=8, shared_x=True, h=H, seed=11),
    "special-experts-mixed": dict(moe=14, zero=1, copy=1, const=2, special_frac=0.3, mask="2d", h=H, seed=12),
    "zero-experts-only": dict(moe=7, zero=2, special_frac=0.4, h=H, seed=16),
    "copy-experts-only-mask1d": dict(moe=7, copy=1, special_frac=0.4, mask="1d", h=H, seed=17),
    "const-experts-only-fp16": dict(moe=7, const=3, special_frac=0.4, dtype="fp16", h=H, seed=18),
    "special-quant2-comm-quant2": dict(moe=14, zero=1, copy=2, const=1, special_frac=0.5, quant=2, smooth=True,
                                       comm_quant=2, mask="2d", h=H, seed=19),
    "all-special-slots": dict(moe=7, zero=1, copy=1, const=1, special_frac=1.0, h=H, seed=21),
    "tp2-ep4-shared": dict(tp=2, moe=3, shared_ranks=1, h=H, seed=13),
    "tp2-ep4-quant-fp16-mask2d": dict(tp=2, moe=4, shared_ranks=0, k=2, quant=2, smooth=True, mask="2d",
                                      dtype="fp16", h=H, seed=14),
    "repeated-calls": dict(moe=14, quant=2, calls=3, h=H, seed=15),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scenario_matches_reference(world, name):
    fields = dict(CASES[name])
    if fields.get("tp") == 2:
        fields["ep"] = 4
    check_scenario(world, **fields)


def test_group_objects_instead_of_names(world):
    check_scenario(world, run_kwargs={"by_name": False}, h=H, seed=20)


ELASTIC = {
    "doc-example": dict(moe=7, k=3, zero=1, copy=1, const=1, data="doc", experts="identity", removed="2,3,4,5"),
    "doc-example-special": dict(moe=7, k=3, zero=1, copy=1, const=1, data="doc", experts="identity",
                                special_frac=1.0, removed="2,3,4,5", h=H),
    "L1-random-special-mask2d": dict(moe=7, k=3, zero=1, copy=1, const=1, special_frac=0.3, mask="2d",
                                     removed="3,6", h=H, seed=30),
    "L2-shared": dict(moe=14, k=4, removed="1,5", h=H, seed=31),
    "L2-quant-uneven": dict(moe=14, k=3, quant=2, smooth=True, uneven=True, removed="4,5,6", h=H, seed=32),
    "no-shared-L1": dict(shared_ranks=0, moe=8, k=2, removed="0,2", h=H, seed=33),
    "shared-replicas": dict(shared_ranks=2, moe=6, k=2, removed="3", h=H, seed=34),
    "several-calls": dict(moe=7, k=2, calls=3, comm_quant=2, removed="2,7", h=H, seed=35),
    "flag0-shapes": dict(moe=14, k=2, elastic_flag0=True, h=H, seed=36),
}


@pytest.mark.parametrize("name", list(ELASTIC))
def test_elastic_removed_ranks_idle(world, name):
    """Warm-up on all 8 ranks, then only the survivors call with elastic_info; removed ranks idle."""
    check_scenario(world, target=mp_cases.elastic, run_kwargs={"removed_mode": "idle"}, **ELASTIC[name])


def test_one_bad_rank_among_8_fails_all_with_its_message(world):
    res = world.run(mp_cases.bad_call, op="dispatch", change={"quant_mode": 1}, bad_ranks=[5], h=H)
    assert_all_raise(res, 561002, "quant_mode", bad_ranks=[5])
    for g, r in enumerate(res):
        if g != 5:
            assert "static quant (1) is not supported" in r.error.message, r.error.message   # the bad rank's words
    res = world.run(mp_cases.mismatched_calls, odd_rank=3, h=H)
    assert_all_raise(res, 561002, "rank 3 called dispatch #", kind=ErrorKind.MISMATCHED_CALL, culprits=(3,))
    assert all("while ranks 0-2, 4-7 called combine #" in r.error.message for r in res), res[0]
    check_scenario(world, h=H, seed=50)


@pytest.mark.parametrize("fields", [
    dict(h=H, seed=60),
    dict(shared=1, shared_ranks=4, moe=8, k=2, quant=2, smooth=True, mask="2d", h=H, seed=61),
    dict(tp=2, ep=4, moe=3, shared_ranks=1, k=2, uneven=True, h=H, seed=62),
], ids=["plain", "shared-replicas-quant-mask", "tp2-uneven"])
def test_v1_api_matches_v2(world, fields):
    assert [o.get() for o in world.run(mp_cases.v1_matches_v2, **fields)] == [True] * 8


def test_v1_with_two_shared_experts_is_rejected_everywhere(world):
    """torch_npu gives a V1 shared rank G // S rows: 16 here, where 2 shared experts on 4 ranks
    may send it 32 (V1 supports one shared expert)."""
    res = world.run(mp_cases.v1_matches_v2, shared=2, shared_ranks=4, moe=8, k=2, h=H, seed=63)
    assert_all_raise(res, 561002, "V1 allocates G // S rows", bad_ranks=[0, 1, 2, 3])


def test_both_transports_are_bit_exact_and_auto_saves_the_rows_exchange(world):
    """EMU_TRANSPORT=split: a header and a rows exchange per call; auto: the rows ride with the
    header once the group has a slot (3 calls: 2 + 1 + 1 per op at most)."""
    fields = dict(h=H, seed=70, calls=3, quant=2, mask="2d", moe=7, k=3)
    want = run_reference(Scenario(**fields))
    counts = {}
    for transport in ("split", "auto", "auto"):
        res = world.run(mp_cases.collectives, env={"EMU_TRANSPORT": transport}, **fields)
        for g, o in enumerate(res):
            (dispatch, x_out, _), _ = o.get()
            assert not compare(RankResult(dispatch=dispatch, x_out=x_out), want[g]), (transport, g)
        counts[transport] = [o.get()[1] for o in res]
    assert counts["split"] == [2 * 2 * 3] * 8                    # dispatch and combine, header + rows, 3 calls
    assert counts["auto"] == [2 * 3] * 8                         # the second auto run: the group has its slot


@pytest.mark.parametrize("fields,bare", [
    (dict(), 2),                                                          # a shared rank, 1 expert per MoE rank
    (dict(shared=0, shared_ranks=0, moe=8, k=8, mask="2d", shared_x=True), 2),   # every token to every rank
    (dict(mask="1d"), 2),
    (dict(dtype="fp16", global_bs=96, uneven=True), 2),                  # maxBs 12, Bs 6 to 8
    (dict(zero=1, copy=1, const=1, special_frac=0.3), 2),
    (dict(tp=2, ep=4, moe=3, shared_ranks=1, k=2), 3),     # both TP exchanges; combine's EP rows are a TP sum
    (dict(tp=2, ep=4, moe=3, shared_ranks=1, k=2, quant=2, mask="1d"), 2),   # int8 rows bare on TP, scales as words
    (dict(quant=2, smooth=True), 1),                                      # dispatch packs its int8 rows
    (dict(comm_quant=2), 1),                                              # combine packs its int8 rows
    (dict(moe=14, k=4), 0),                                               # 2 experts per rank: never bare
], ids=["shared-rank", "all-ranks", "mask-1d", "fp16-uneven", "special", "tp2", "tp2-quant2", "quant2", "comm-quant2", "two-experts"])
def test_bare_rows_are_bit_exact_and_go_bare_when_the_op_can(world, fields, bare):
    """EMU_TRANSPORT=bare: from an op's second call on a group, its rows go straight from and
    into the op's tensors where it can: on EP with one expert per rank and no int8 rows (and
    not combine's TP sums), on TP always; every output is bit-exact either way (``bare``
    exchanges per call; of 3 calls the last 2 go bare, the first one too when the world's
    earlier calls on the group planned it)."""
    fields = dict(h=H, seed=80, calls=3, **fields)
    want = run_reference(Scenario(**fields))
    res = world.run(mp_cases.bare, env={"EMU_TRANSPORT": "bare"}, **fields)
    for g, o in enumerate(res):
        (dispatch, x_out, _), went = o.get()
        assert not compare(RankResult(dispatch=dispatch, x_out=x_out), want[g]), g
        assert 2 * bare <= went <= 3 * bare, (g, went)         # the first call too when the group's last one planned it


def test_a_call_whose_bound_grew_sends_packed_rows_then_bare_again(world):
    """The bare slot of a group holds the metadata of the last calls' bound (global_bs 64: 8 rows
    from one source to one peer); a dispatch with global_bs 128 may send 16, so it sends packed
    rows, bit-exact, and plans the larger slot, which the group's next calls share: the combine
    after it and the next call of both ops go bare (3 of 4)."""
    small = dict(h=H, seed=81, calls=2, global_bs=64)
    world.run(mp_cases.bare, env={"EMU_TRANSPORT": "bare"}, **small)
    large = dict(h=H, seed=82, calls=2, global_bs=128, bs=12)
    want = run_reference(Scenario(**large))
    for g, o in enumerate(world.run(mp_cases.bare, env={"EMU_TRANSPORT": "bare"}, **large)):
        (dispatch, x_out, _), went = o.get()
        assert not compare(RankResult(dispatch=dispatch, x_out=x_out), want[g]), g
        assert went == 3, (g, went)


@pytest.mark.parametrize("op,change,code,text,fields", [
    ("dispatch", {"x": None}, 161001, "x=None", dict(h=H)),
    ("dispatch", {"group_ep": "g" * 130}, 161001, "group_ep", dict(h=H)),
    ("dispatch", {"elastic_info": derive(first_rows, "elastic_info", -1)}, 561002, "elastic_info.shape[0]",
     dict(moe=14, k=4, removed="1,5", h=H)),
    ("combine", {"expert_scales": derive(cast, "expert_scales", torch.float16)}, 161002, "expert_scales.dtype",
     dict(tp=2, ep=4, moe=3, shared_ranks=1, k=2, h=H)),
], ids=["x-null", "group-ep-long", "elastic-short-table", "tp2-combine-dtype"])
def test_one_bad_rank_among_8_then_the_same_groups_go_on(world, op, change, code, text, fields):
    """Rank 6 alone gets the bad input; every caller raises at once, then the next call works."""
    res = world.run(mp_cases.bad_call, op=op, change=change, bad_ranks=[6], **fields)
    removed = {int(r) for r in fields.get("removed", "").split(",") if r}
    assert_all_raise([r for r in res if r.rank not in removed], code, text, bad_ranks=[6])
    if removed:
        check_scenario(world, target=mp_cases.elastic, run_kwargs={"warmup": False}, **fields, seed=51)
    else:
        check_scenario(world, **fields, seed=51)
