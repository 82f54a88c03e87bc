"""Validation order and rules without processes (docs/errors.md); the multi-process error tests
check that every rank raises.  Also the HCCL_BUFFSIZE window formula (docs/errors.md)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu.a3.checks import hccl_buffsize_bytes, validate_combine, validate_dispatch, window_need
from emu.core.checks import usable_remap
from emu.core.attrs import Geometry, MoeConfig
from emu.core.errors import AclnnError
from emu.core.inputs import CombineInputs, DispatchInputs, SpecialExperts
from emu import chips
from emu.core.request import CombineRequest, DispatchRequest, Placement, attempt

pytestmark = pytest.mark.timeout(30)


def _place(kw: dict) -> Placement:
    return Placement(group_ep=None, ep_name=kw.pop("ep_name", "ep"), ep_rank_id=kw.pop("ep_rank_id", 0),
                     tp_name=kw.pop("tp_name", ""), tp_rank_id=kw.pop("tp_rank_id", 0), comm_alg=kw.pop("comm_alg", ""))


def _dispatch(**over):
    cfg = over.pop("cfg", MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1))
    place = _place(over)
    kw = dict(x=torch.zeros(4, 1024, dtype=torch.bfloat16), expert_ids=torch.zeros(4, 2, dtype=torch.int32))
    kw.update(over)
    return validate_dispatch(DispatchRequest(DispatchInputs(**kw), cfg, place))


def _raises(code: int, text: str, fn, **over):
    with pytest.raises(AclnnError) as info:
        fn(**over)
    assert info.value.code == code, info.value
    assert text in str(info.value), info.value
    return info.value


def test_valid_dispatch_geometry():
    g = _dispatch()
    assert (g.W, g.S, g.Ns, g.E, g.L, g.K, g.H, g.G, g.max_bs) == (8, 1, 1, 7, 1, 2, 1024, 32, 4)
    assert g.capacity(0) == 4 * 8 and g.capacity(1) == 32 * 1


def test_null_before_dtype_before_tiling():
    # x is null AND ids have the wrong dtype AND ep is out of range: the wrapper's null check wins
    bad_cfg = MoeConfig(ep_world_size=1, moe_expert_num=7)
    _raises(161001, "x=None", _dispatch, x=None, expert_ids=torch.zeros(4, 2, dtype=torch.int64), cfg=bad_cfg)
    _raises(161002, "expert_ids.dtype", _dispatch, expert_ids=torch.zeros(4, 2, dtype=torch.int64), cfg=bad_cfg)
    _raises(561002, "ep_world_size", _dispatch, cfg=bad_cfg)


def test_tiling_order_attributes_before_shapes():
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, quant_mode=1)
    _raises(561002, "static", _dispatch, cfg=cfg, x=torch.zeros(4, 100, dtype=torch.bfloat16))
    _raises(561002, "H", _dispatch, x=torch.zeros(4, 100, dtype=torch.bfloat16))


def test_shared_rewrite_and_rules():
    # default shared_expert_num=1 with S=0 means no shared expert
    g = _dispatch(cfg=MoeConfig(ep_world_size=8, moe_expert_num=8))
    assert g.Ns == 0 and g.L == 1
    _raises(561002, "shared_expert_num", _dispatch, cfg=MoeConfig(ep_world_size=8, moe_expert_num=8,
                                                                   shared_expert_num=2))
    _raises(561002, "shared_expert_rank_num", _dispatch,
            cfg=MoeConfig(ep_world_size=8, moe_expert_num=5, shared_expert_num=2, shared_expert_rank_num=3))


def test_tp2_rules():
    cfg = MoeConfig(ep_world_size=4, moe_expert_num=8, tp_world_size=2)
    _raises(561002, "group_tp", _dispatch, cfg=cfg, tp_name="")
    _raises(561002, "one MoE expert per rank", _dispatch, cfg=cfg, tp_name="tp")
    cfg = MoeConfig(ep_world_size=4, moe_expert_num=4, tp_world_size=2, comm_quant_mode=2)
    kw = _combine_kw(cfg)
    _raises(561002, "comm_quant_mode", validate_combine, **kw)


def test_global_bs_rules():
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, global_bs=36)
    _raises(561002, "global_bs", _dispatch, cfg=cfg)
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, global_bs=24)
    _raises(561002, "global_bs", _dispatch, cfg=cfg)                      # < Bs*ep = 32
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, global_bs=64)
    assert _dispatch(cfg=cfg).max_bs == 8
    _raises(561002, "x_active_mask", _dispatch, cfg=cfg, x_active_mask=torch.ones(4, dtype=torch.bool))


def test_special_ids_and_k_limit():
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, zero_expert_num=1)
    assert _dispatch(cfg=cfg, expert_ids=torch.zeros(4, 8, dtype=torch.int32)).K == 8
    _raises(561002, "K", _dispatch, cfg=cfg, expert_ids=torch.zeros(4, 9, dtype=torch.int32))


@pytest.mark.parametrize("raw,mib", [(None, 200), ("", 200), ("abc", 200), ("512", 512), ("12MB", 12),
                                     (" 7", 7), ("65537", 1), ("-1", 65535), ("99999999999", 200)])
def test_hccl_buffsize_parsing(monkeypatch, raw, mib):
    if raw is None:
        monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    else:
        monkeypatch.setenv("HCCL_BUFFSIZE", raw)
    assert hccl_buffsize_bytes() == mib * 2**20


def test_window_formula_by_hand():
    """H 7168, ep 8, L 1, K 8, N_s 1, maxBs 8: disp = Align512(14336 + 44) = 14848,
    comb = 14336, need = 2*(8*14848*8*1 + 8*14336*9) = 3,964,928 bytes."""
    g = Geometry(W=8, S=1, Ns=1, E=7, K=8, H=7168, G=64, tp=0)
    assert window_need(g) == 2 * (8 * 14848 * 8 + 8 * 14336 * 9) == 3_964_928


def test_window_check_uses_environment(monkeypatch):
    monkeypatch.setenv("HCCL_BUFFSIZE", "3")
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, global_bs=512)
    _raises(561002, "HCCL_BUFFSIZE", _dispatch, cfg=cfg)
    monkeypatch.setenv("HCCL_BUFFSIZE", "400")
    _dispatch(cfg=cfg)


def _combine_kw(cfg: MoeConfig, **over):
    """{"req": a valid combine request on EP rank 0, with ``over`` replacing its tensors or placement}."""
    g = Geometry.of(cfg, 4, 2, 1024)
    a = g.capacity(0)
    place = _place(dict(over, tp_name=over.pop("tp_name", "tp" if cfg.tp_world_size == 2 else "")))
    for name in ("ep_name", "tp_name", "ep_rank_id", "tp_rank_id", "comm_alg"):
        over.pop(name, None)
    kw = dict(expand_x=torch.zeros(a * max(cfg.tp_world_size, 1), 1024, dtype=torch.bfloat16),
              expert_ids=torch.zeros(4, 2, dtype=torch.int32), assist_info=torch.zeros(128 * a, dtype=torch.int32),
              ep_send_counts=torch.zeros(g.W * g.L * 2, dtype=torch.int32), expert_scales=torch.zeros(4, 2),
              tp_send_counts=torch.zeros(cfg.tp_world_size, dtype=torch.int32))
    kw.update(over)
    return {"req": CombineRequest(CombineInputs(**kw, special=SpecialExperts.of(cfg)), cfg, place)}


def test_combine_rules():
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1)
    validate_combine(**_combine_kw(cfg))
    validate_combine(**_combine_kw(cfg, tp_send_counts=None))                # SGLang passes None (docs/errors.md)
    _raises(161001, "expert_scales=None", validate_combine, **_combine_kw(cfg, expert_scales=None))
    _raises(161002, "group_ep", validate_combine, **_combine_kw(cfg, ep_name="x" * 128))
    _raises(161002, "expand_x.dtype", validate_combine,
            **_combine_kw(cfg, expand_x=torch.zeros(32, 1024, dtype=torch.int8)))
    _raises(561002, "assist_info_for_combine.shape[0]", validate_combine,
            **_combine_kw(cfg, assist_info=torch.zeros(10, dtype=torch.int32)))
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, const_expert_num=1)
    _raises(561002, "ori_x", validate_combine, **_combine_kw(cfg))
    tp_cfg = MoeConfig(ep_world_size=4, moe_expert_num=4, tp_world_size=2)
    _raises(561002, "tp_send_counts", validate_combine, **_combine_kw(tp_cfg, tp_send_counts=None))


# ----------------------------------------------------------------------------- any attribute value

_INTS = st.integers(min_value=-3, max_value=40)
_ATTRS = ("ep_world_size", "moe_expert_num", "tp_world_size", "expert_shard_type", "shared_expert_num",
          "shared_expert_rank_num", "quant_mode", "global_bs", "expert_token_nums_type", "comm_quant_mode",
          "zero_expert_num", "copy_expert_num", "const_expert_num")


def _table(data, world: int):
    """None, or an elastic_info of a random length, dtype and contents."""
    if not data.draw(st.booleans()):
        return None
    n = data.draw(st.sampled_from([4 + 2 * max(world, 0), 4 + 2 * max(world, 0) - 1, 3, 0]))
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    return torch.tensor(data.draw(st.lists(st.integers(-2, 9), min_size=n, max_size=n)), dtype=dtype)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_checks_reject_any_attribute_values_with_the_operators_errors(data):
    """Every chip's checks meet arbitrary attribute values (zero, negative, S == W, tables of any
    length and dtype) with an operator error of their own making, never a Python error in them."""

    cfg = MoeConfig(**{a: data.draw(_INTS, label=a) for a in _ATTRS})
    place = Placement(group_ep=None, ep_name="ep", ep_rank_id=data.draw(_INTS, label="ep_rank_id"),
                      tp_name=data.draw(st.sampled_from(["", "tp"])), tp_rank_id=data.draw(st.integers(-1, 2)))
    table = _table(data, cfg.ep_world_size)
    bs, k = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    ids = torch.zeros(bs, k, dtype=torch.int32)
    dispatch = DispatchRequest(DispatchInputs(x=torch.zeros(bs, 1024, dtype=torch.bfloat16), expert_ids=ids,
                                              elastic_info=table), cfg, place)
    combine = CombineRequest(CombineInputs(expand_x=torch.zeros(64, 1024, dtype=torch.bfloat16), expert_ids=ids,
                                           assist_info=torch.zeros(128 * 64, dtype=torch.int32),
                                           ep_send_counts=torch.zeros(data.draw(st.integers(0, 80)), dtype=torch.int32),
                                           expert_scales=torch.zeros(bs, k), elastic_info=table,
                                           tp_send_counts=torch.zeros(max(cfg.tp_world_size, 0), dtype=torch.int32)),
                             cfg, place)
    if cfg.ep_world_size > 0:              # the domain an elastic call runs on, read from any table
        remap = usable_remap(table, cfg.ep_world_size, min(max(place.ep_rank_id, 0), cfg.ep_world_size - 1))
        assert remap is None or not remap.active or 0 < remap.new_world <= cfg.ep_world_size
    for soc in ("A3", "A2"):
        chip = chips.chip(soc)
        for req, check in ((dispatch, chip.check_dispatch), (combine, chip.check_combine)):
            out = attempt(check, chip.adapt(req))
            assert out.error is None or "malformed argument" not in str(out.error), (soc, req.kind, out.error)
