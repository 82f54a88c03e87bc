"""Functions the test worlds run on every rank (``emu_world.run(mp_cases.fn, ...)``); each
finds its rank with ``emu.testing.this_rank()``."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from unittest import mock

import torch

import emu
from emu.core.layout import DispatchOutputs
from emu.testing.scenario import (Scenario, combine_inputs, combine_kwargs, dispatch_kwargs, expert_outputs,
                                  make_rank_data, route, run_rank)
from emu.testing import leave, this_rank
from world_groups import groups_for


def scenario(by_name: bool = True, **fields) -> tuple:
    """Run one scenario on this rank; returns (dispatch 7-tuple, x_out, perf wait_us)."""
    rank = this_rank().rank
    sc = Scenario(**fields)
    ep_g, tp_g = groups_for(sc)
    if by_name:
        ep_g, tp_g = emu.group_name(ep_g), (emu.group_name(tp_g) if tp_g is not None else "")
    res = run_rank(sc, rank, ep_g, tp_g if tp_g is not None else "")
    return tuple(res.dispatch), res.x_out, res.seconds["wait_us"]


def _names(sc: Scenario) -> tuple[str, str]:
    ep_g, tp_g = groups_for(sc)
    return emu.group_name(ep_g), emu.group_name(tp_g) if tp_g is not None else ""


def _dispatch_kwargs(sc: Scenario, rank: int) -> dict:
    inp = replace(make_rank_data(sc, rank).dispatch, elastic_info=sc.elastic_info())
    return dispatch_kwargs(sc, rank, *_names(sc), inp)


def _combine_kwargs(sc: Scenario, rank: int, outs: tuple) -> dict:
    """Combine's keyword arguments after dispatch returned ``outs`` (the scenario's experts)."""
    data = make_rank_data(sc, rank)
    out = DispatchOutputs(*outs)
    geom, me = route(sc, rank // (2 if sc.tp == 2 else 1))
    return combine_kwargs(sc, rank, *_names(sc), combine_inputs(sc, data, out, expert_outputs(sc, geom, me, out)))


def _call(fn, kw: dict):
    args = [kw.pop(n) for n in (["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"]
                                if fn is emu.moe_distribute_dispatch_v2 else
                                ["expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts",
                                 "expert_scales", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"])]
    return fn(*args, **kw)


def bad_call(op: str, change: dict, bad_ranks: list[int] | None = None, env: dict | None = None,
             callers: list[int] | None = None, **fields) -> str:
    """One call of ``op`` where ``bad_ranks`` (None = all) apply ``change`` to their kwargs.

    Only ``callers`` (default: the scenario's survivors) call the op; the others answer "idle".

    ``change`` maps a keyword to a new value, or to a mutator (``mutators.derive``) called with
    the original kwargs to derive a bad tensor from a good one.
    """
    rank = this_rank().rank
    sc = Scenario(**fields)
    if rank not in (callers if callers is not None else sc.survivors()):
        return "idle"
    kw = _dispatch_kwargs(sc, rank)
    bad = bad_ranks is None or rank in bad_ranks
    with mock.patch.dict(os.environ, {"EMU_SOC": sc.soc}):   # the chip is chosen for the whole call
        fn = emu.moe_distribute_dispatch_v2
        if op == "combine":
            outs = _call(emu.moe_distribute_dispatch_v2, dict(kw))
            kw = _combine_kwargs(sc, rank, outs)
            fn = emu.moe_distribute_combine_v2
        if bad:
            orig = dict(kw)
            for name, value in change.items():
                kw[name] = value(orig) if callable(value) else value
        with mock.patch.dict(os.environ, (env or {}) if bad else {}):
            _call(fn, kw)
    return "ok"


def mismatched_calls(odd_rank: int, **fields) -> str:
    """Every rank dispatches; then ``odd_rank`` dispatches again while the others combine."""
    rank = this_rank().rank
    sc = Scenario(**fields)
    kw = _dispatch_kwargs(sc, rank)
    outs = _call(emu.moe_distribute_dispatch_v2, dict(kw))
    if rank == odd_rank:
        _call(emu.moe_distribute_dispatch_v2, dict(kw))
    else:
        _call(emu.moe_distribute_combine_v2, _combine_kwargs(sc, rank, outs))
    return "ok"


def delayed_dispatch(late_rank: int, delay_s: float, **fields) -> list[int]:
    """Dispatch twice with ``late_rank`` entering ``delay_s`` late; returns performance_info."""
    rank = this_rank().rank
    sc = Scenario(**fields)
    perf = torch.full((sc.ep,), 5, dtype=torch.int64)              # the op adds, never clears
    for _ in range(2):
        kw = _dispatch_kwargs(sc, rank)
        if rank == late_rank:
            time.sleep(delay_s)
        _call(emu.moe_distribute_dispatch_v2, dict(kw, performance_info=perf))
    return perf.tolist()


def elastic(removed_mode: str = "idle", warmup: bool = True, directory: str | None = None, **fields):
    """The doc's elastic flow on this rank: an optional non-elastic warm-up on every rank, then
    only the survivors run the scenario.  Removed ranks idle (return "idle") or die: they report
    "dead" and their process exits with code 0 before the survivors are done."""
    rank = this_rank().rank
    sc = Scenario(**fields)
    if warmup:
        full = Scenario(**{**fields, "removed": "", "elastic_flag0": False})
        scenario(**full.asdict())
    if rank in sc.survivors():
        return traced(directory, **fields) if directory else scenario(**fields)
    if removed_mode == "dead":
        leave("dead")
    time.sleep(0.2)                                                # idle: doing something else
    return "idle"


def with_fault(fault: str, **fields):
    """Run a scenario with ``EMU_FAULT=fault`` set (the named rank exits mid-call);
    returns (result or raise, seconds until this rank returned or raised)."""
    t0 = time.monotonic()
    with mock.patch.dict(os.environ, {"EMU_FAULT": fault}):
        try:
            scenario(**fields)
            return "finished", time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return f"{type(exc).__name__}: {exc}", time.monotonic() - t0, getattr(exc, "kind", None), \
                getattr(exc, "culprits", ()), getattr(exc, "states", {})


def traced(directory: str, **fields):
    """Run a scenario with tracing into ``directory`` (then tracing off again)."""
    emu.enable_trace(directory)
    try:
        return scenario(**fields)
    finally:
        emu.disable_trace()


def v1_matches_v2(**fields) -> bool:
    """The V1 pair (torch_npu names, expand_idx, rows back by position) gives the V2 outputs."""
    rank = this_rank().rank
    sc = Scenario(**fields)
    kw = _dispatch_kwargs(sc, rank)
    for name in ("elastic_info", "zero_expert_num", "copy_expert_num", "const_expert_num", "comm_alg",
                 "performance_info"):
        kw.pop(name)
    outs2 = _call(emu.moe_distribute_dispatch_v2, dict(kw))
    args = [kw.pop(n) for n in ["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"]]
    outs1 = emu.moe_distribute_dispatch(*args, **kw)
    same = all(torch.equal(a, b) for i, (a, b) in enumerate(zip(outs1, outs2)) if i != 2)
    ck = _combine_kwargs(sc, rank, outs2)
    for name in ("elastic_info", "zero_expert_num", "copy_expert_num", "const_expert_num", "comm_alg", "ori_x",
                 "const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v", "performance_info"):
        ck.pop(name)
    y2 = _call(emu.moe_distribute_combine_v2, dict(ck))
    ck.pop("assist_info_for_combine")
    y1 = emu.moe_distribute_combine(ck.pop("expand_x"), ck.pop("expert_ids"), outs1[2], ck.pop("ep_send_counts"),
                                    ck.pop("expert_scales"), ck.pop("group_ep"), ck.pop("ep_world_size"),
                                    ck.pop("ep_rank_id"), ck.pop("moe_expert_num"), **ck)
    return same and torch.equal(y1, y2) and outs1[2].numel() == sc.rank_bs(rank // (2 if sc.tp == 2 else 1)) * sc.k
