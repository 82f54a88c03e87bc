"""The steady-state fast path (emu.core.fastpath): the static checks run once per signature.

A signature changes with every attribute, name, rank, shape, dtype and presence of an input, with
the chip and with the environment the checks read, and with nothing else; a call that hits the
memo gives exactly what the full path gives: the same validated call, or the same error (class,
code, message) in the same order.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from emu import chips
from emu.a3 import steady
from emu.core import fastpath
from emu.core.attrs import MoeConfig
from emu.core.inputs import CombineInputs, DispatchInputs, SpecialExperts
from emu.core.request import CombineRequest, DispatchRequest, Placement, attempt

pytestmark = pytest.mark.timeout(60)

CFG = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1)
PLACE = Placement(group_ep=None, ep_name="ep", ep_rank_id=1)


def _dispatch(cfg: MoeConfig = CFG, place: Placement = PLACE, **tensors) -> DispatchRequest:
    kw = dict(x=torch.ones(4, 1024, dtype=torch.bfloat16), expert_ids=torch.tensor([[0, 1]] * 4, dtype=torch.int32))
    kw.update(tensors)
    return DispatchRequest(DispatchInputs(**kw), cfg, place)


def _combine(cfg: MoeConfig = CFG, place: Placement = PLACE, **tensors) -> CombineRequest:
    kw = dict(expand_x=torch.ones(32, 1024, dtype=torch.bfloat16), expert_ids=torch.tensor([[0, 1]] * 4, dtype=torch.int32),
              assist_info=torch.zeros(128 * 32, dtype=torch.int32), ep_send_counts=torch.zeros(16, dtype=torch.int32),
              expert_scales=torch.ones(4, 2))
    kw.update(tensors)
    return CombineRequest(CombineInputs(**kw, special=SpecialExperts.of(cfg)), cfg, place)


def _key(req, soc: str = "A3"):
    chip = chips.chip(soc)
    return fastpath.MEMO.key(getattr(chip, f"check_{req.kind}"), chip.adapt(req))


def _tensor_variants(name: str, t: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Another shape, another dtype, absent (or present when absent)."""
    if t is None:
        return [torch.zeros(4, 2)]
    other = torch.int64 if t.dtype != torch.int64 else torch.int32
    return [torch.cat([t, t[:1]]) if t.numel() else torch.zeros(1, dtype=t.dtype), t.to(other), None]


def _mutations(req) -> list[tuple[str, object]]:
    out = []
    for f in dataclasses.fields(MoeConfig):
        out.append((f"cfg.{f.name}", dataclasses.replace(req, cfg=dataclasses.replace(
            req.cfg, **{f.name: getattr(req.cfg, f.name) + 1}))))
    for name, value in (("ep_name", "ep2"), ("ep_rank_id", 2), ("tp_name", "tp"), ("tp_rank_id", 1),
                        ("comm_alg", "fullmesh_v1")):
        out.append((f"place.{name}", dataclasses.replace(req, place=dataclasses.replace(req.place, **{name: value}))))
    for f in dataclasses.fields(req.inputs):
        value = getattr(req.inputs, f.name)
        if isinstance(value, torch.Tensor) or value is None:
            for i, v in enumerate(_tensor_variants(f.name, value)):
                out.append((f"inputs.{f.name}#{i}", dataclasses.replace(req, inputs=dataclasses.replace(
                    req.inputs, **{f.name: v}))))
    out.append(("op", dataclasses.replace(req, op=req.op + " (V1)")))
    return out


@pytest.mark.parametrize("make", [_dispatch, _combine], ids=["dispatch", "combine"])
def test_signature_changes_with_everything_the_checks_read(make, monkeypatch):
    req = make()
    base = _key(req)
    assert base is not None and _key(make()) == base
    for what, other in _mutations(req):
        assert _key(other) != base, f"the signature ignores {what}"
    assert _key(req, "A2") != base, "the signature ignores the chip"
    for env in fastpath.ENV:
        monkeypatch.setenv(env, "7")
        assert _key(req) != base, f"the signature ignores {env}"
        monkeypatch.delenv(env)
    assert _key(req) == base


@pytest.mark.parametrize("make", [_dispatch, _combine], ids=["dispatch", "combine"])
def test_steady_state_is_kept_per_signature_and_environment(make, monkeypatch):
    """What a steady call reuses (emu.a3.steady) is found by the same signature, and by every
    environment variable the checks or the transport read: any change is another entry."""
    req = make()
    base = steady._key(req)
    assert base is not None and steady._key(make()) == base
    for what, other in _mutations(req):
        assert steady._key(other) != base, f"the steady state ignores {what}"
    for env in steady.KEY_ENV:
        monkeypatch.setenv(env, "7")
        assert steady._key(req) != base, f"the steady state ignores {env}"
        monkeypatch.delenv(env)
    assert steady._key(req) == base


def test_signature_ignores_values():
    """Same attributes, shapes and dtypes, other data: one signature (the decode loop's case)."""
    a = _dispatch()
    b = _dispatch(x=torch.randn(4, 1024).bfloat16(), expert_ids=torch.tensor([[5, 6]] * 4, dtype=torch.int32))
    assert _key(a) == _key(b)


def test_a_passing_signature_is_checked_once_and_a_failing_one_always(monkeypatch):
    fastpath.MEMO.clear()
    chip = chips.chip("A3")
    for _ in range(3):
        assert attempt(chip.check_dispatch, _dispatch()).error is None
    assert (fastpath.MEMO.hits, fastpath.MEMO.misses) == (2, 1)
    bad = _dispatch(x=torch.ones(4, 100, dtype=torch.bfloat16))              # H out of range: static
    errors = [attempt(chip.check_dispatch, bad).error for _ in range(2)]
    assert errors[0].code == errors[1].code == 561002 and str(errors[0]) == str(errors[1])
    assert fastpath.MEMO.misses == 3
    monkeypatch.setenv("EMU_FASTPATH", "0")
    attempt(chip.check_dispatch, _dispatch())
    assert (fastpath.MEMO.hits, fastpath.MEMO.misses) == (2, 4)


def _outcome(check, req):
    out = attempt(check, req)
    if out.error is not None:
        return type(out.error).__name__, out.error.code, str(out.error)
    p = out.prep
    return p.geom, p.shapes, p.me, p.agreed, p.algorithm, p.act.tokens.tolist(), p.remap.to_new.tolist()


_IDS = st.integers(min_value=-2, max_value=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fast_path_gives_what_the_full_path_gives(data):
    """Calls of one signature with any data (expert ids in and out of range, duplicate ids, any
    mask, any elastic table, any counts), one after another: each outcome on the fast path equals
    the full path's, whether the memo was warmed by a passing call or not."""
    soc = data.draw(st.sampled_from(["A3", "A2"]))
    w = 8 if soc == "A3" else 16
    cfg = MoeConfig(ep_world_size=w, moe_expert_num=w, quant_mode=data.draw(st.sampled_from([0, 2])),
                    zero_expert_num=data.draw(st.integers(0, 1)))
    place = Placement(group_ep=None, ep_name="ep", ep_rank_id=data.draw(st.integers(0, w - 1)))
    bs, k = 4, 2
    mask_kind = data.draw(st.sampled_from(["none", "1d", "2d"]))
    elastic = data.draw(st.booleans()) and soc == "A3"
    chip = chips.chip(soc)
    fastpath.MEMO.clear()
    for _ in range(3):
        ids = torch.tensor(data.draw(st.lists(_IDS, min_size=bs * k, max_size=bs * k)), dtype=torch.int32).view(bs, k)
        mask = None if mask_kind == "none" else torch.tensor(
            data.draw(st.lists(st.booleans(), min_size=bs * (k if mask_kind == "2d" else 1),
                               max_size=bs * (k if mask_kind == "2d" else 1)))).view((bs, k) if mask_kind == "2d" else (bs,))
        table = torch.tensor([1, 4, 0, w] + data.draw(st.lists(st.integers(-1, w), min_size=2 * w, max_size=2 * w)),
                             dtype=torch.int32) if elastic else None
        counts = torch.tensor(data.draw(st.lists(st.integers(-1, 40), min_size=2 * w, max_size=2 * w)),
                              dtype=torch.int32)
        reqs = (chip.adapt(_dispatch(cfg, place, expert_ids=ids, x_active_mask=mask, elastic_info=table,
                                     scales=torch.ones(w, 1024) if cfg.quant_mode else None)),
                chip.adapt(_combine(cfg, place, expand_x=torch.ones(w * bs * k, 1024, dtype=torch.bfloat16),
                                    assist_info=torch.zeros(128 * w * bs * k, dtype=torch.int32), expert_ids=ids,
                                    x_active_mask=mask, elastic_info=table, ep_send_counts=counts,
                                    expand_scales=torch.ones(w * bs * k) if soc == "A2" else None)))
        for req in reqs:
            check = getattr(chip, f"check_{req.kind}")
            hits = fastpath.MEMO.hits
            fast = _outcome(check, req)
            event(f"{req.kind} {'fast' if fastpath.MEMO.hits > hits else 'full'} path: "
                  f"{fast[2].split(':')[1][:40] if isinstance(fast[0], str) else 'passes'}")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("EMU_FASTPATH", "0")
                full = _outcome(check, req)
            assert fast == full, (soc, req.kind)
