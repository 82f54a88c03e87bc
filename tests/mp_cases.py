"""Functions the test worlds run on every rank (``emu_world.run(mp_cases.fn, ...)``); each
finds its rank with ``emu.testing.this_rank()``."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from unittest import mock

import torch

import emu
from emu.a3 import steady as a3_steady
from emu.bench.phases import phase_costs
from emu.chips import CHIPS
from emu.comm import call, transport
from emu.comm.context import current
from emu.core.inputs import AddRmsNorm
from emu.core.layout import DispatchOutputs
from emu.core.numerics import comm_dequant, dynamic_quant
from emu.core.numerics import comm_quant as comm_quant_rows
from emu.testing.scenario import (Scenario, combine_inputs, combine_kwargs, dispatch_kwargs, expert_outputs,
                                  make_rank_data, route, run_rank)
from emu.testing import dense_moe, leave, this_rank
from world_groups import groups_for


def collectives(**fields) -> tuple:
    """:func:`scenario`'s outputs with the collectives this rank issued for them."""
    n0 = current().collectives_issued
    dispatch, x_out, waits = scenario(**fields)
    return (dispatch, x_out, waits), current().collectives_issued - n0


def bare(**fields) -> tuple:
    """:func:`scenario`'s outputs with this rank's exchanges whose rows went bare."""
    n0 = current().bare_exchanges
    got = scenario(**fields)
    return got, current().bare_exchanges - n0


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


POSITIONAL = {
    emu.moe_distribute_dispatch_v2: ["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"],
    emu.moe_distribute_dispatch: ["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"],
    emu.moe_distribute_combine_v2: ["expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts",
                                    "expert_scales", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"],
    emu.moe_distribute_combine_add_rms_norm: ["expand_x", "expert_ids", "expand_idx", "ep_send_counts",
                                              "expert_scales", "residual_x", "gamma", "group_ep", "ep_world_size",
                                              "ep_rank_id", "moe_expert_num"],
}


def _call(fn, kw: dict):
    args = [kw.pop(n) for n in POSITIONAL[fn]]
    return fn(*args, **kw)


def _add_rms_norm_kwargs(kw: dict) -> dict:
    """combine_v2's keyword arguments as combine_add_rms_norm takes them (ones as residual, gamma)."""
    kw = dict(kw)
    kw["expand_idx"] = kw.pop("assist_info_for_combine")
    kw.pop("performance_info")
    bs, h = kw["expert_ids"].shape[0], kw["expand_x"].shape[1]
    kw["residual_x"] = torch.ones(bs, 1, h, dtype=torch.bfloat16)
    kw["gamma"] = torch.ones(h, dtype=torch.bfloat16)
    return kw


def bad_call(op: str, change: dict, bad_ranks: list[int] | None = None, bad_env: dict | None = None,
             callers: list[int] | None = None, **fields) -> str:
    """One call of ``op`` where ``bad_ranks`` (None = all) apply ``change`` to their kwargs (and
    ``bad_env`` to their environment).

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
        if op in ("combine", "combine_add_rms_norm"):
            outs = _call(emu.moe_distribute_dispatch_v2, dict(kw))
            kw = _combine_kwargs(sc, rank, outs)
            fn = emu.moe_distribute_combine_v2
        if op == "combine_add_rms_norm":
            kw, fn = _add_rms_norm_kwargs(kw), emu.moe_distribute_combine_add_rms_norm
        if bad:
            orig = dict(kw)
            for name, value in change.items():
                kw[name] = value(orig) if callable(value) else value
        with mock.patch.dict(os.environ, (bad_env or {}) if bad else {}):
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


def add_rms_norm_layer(shared_ranks: int = 0, quant: int = 0, comm_quant: int = 0, mask: bool = False,
                       seed: int = 0) -> list[bool]:
    """dispatch_v2 -> experts -> combine_add_rms_norm on every rank of the world, against a dense
    layer (combine's fp32 sum, + residual_x, RMSNorm): [y, rstd, x equal bit for bit, shapes
    and dtypes as torch_npu allocates].  Experts see each row as the kernel hands it over
    (int8 dequantised with its scale under quant 2), so the dense layer computes the same rows."""
    ctx = this_rank()
    W, r = ctx.size, ctx.rank
    E, K, H, BS = 2 * (W - shared_ranks), 3, 1024, 6
    g = torch.Generator().manual_seed(1000 * seed + r)
    x = torch.randn(BS, H, generator=g).bfloat16()
    ids = torch.rand(BS, E, generator=g).argsort(dim=1)[:, :K].int()
    w = torch.rand(BS, K, generator=g)
    residual = torch.randn(BS, 1, H, generator=g).bfloat16()
    gamma = (torch.rand(H, generator=g) + 0.5).bfloat16()
    active = (torch.rand(BS, K, generator=g) > 0.3) if mask else None

    def seen(rows: torch.Tensor) -> torch.Tensor:          # what an expert gets for x rows, in fp32
        if not quant:
            return rows.float()
        q, scale = dynamic_quant(rows, None)
        return q.float() * scale[:, None]

    def wire(y: torch.Tensor) -> torch.Tensor:             # combine's int8 wire (comm_quant_mode 2)
        return comm_dequant(*comm_quant_rows(y), torch.bfloat16) if comm_quant else y

    def expert(e: int, rows32: torch.Tensor) -> torch.Tensor:
        return (rows32 * (0.25 * (e + 1))).bfloat16()

    def shared(rows32: torch.Tensor) -> torch.Tensor:
        return (rows32 * 0.5).bfloat16()

    expand_x, dyn, assist, counts, ep_recv, _, _ = emu.moe_distribute_dispatch_v2(
        x, ids, ctx.group_ep, W, r, E, x_active_mask=active, shared_expert_rank_num=shared_ranks, quant_mode=quant)
    rows32 = expand_x.float() * dyn[:, None] if quant else expand_x.float()
    y = torch.zeros(expand_x.shape[0], H, dtype=torch.bfloat16)
    ends = counts.cumsum(0).tolist()
    for local, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        y[lo:hi] = shared(rows32[lo:hi]) if r < shared_ranks else \
            expert((r - shared_ranks) * counts.numel() + local, rows32[lo:hi])
    got = emu.moe_distribute_combine_add_rms_norm(
        y, ids, assist, ep_recv, w, residual, gamma, ctx.group_ep, W, r, E, x_active_mask=active,
        shared_expert_rank_num=shared_ranks, comm_quant_mode=comm_quant)
    want = dense_moe(x, ids, w, lambda e, rows: wire(expert(e, seen(rows))), lambda j, xs: wire(shared(seen(xs))),
                     1 if shared_ranks else 0, active, AddRmsNorm(residual, gamma, 1e-6))
    return [a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want)]


V2_ONLY = ("elastic_info", "zero_expert_num", "copy_expert_num", "const_expert_num", "comm_alg", "performance_info")


def _described(kw: dict) -> dict:
    """Arguments as the test process rebuilds them for a meta function: tensors as (shape, dtype)."""
    return {k: ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _outputs(outs) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(o.shape), o.dtype) for o in (outs if isinstance(outs, (tuple, list)) else [outs])]


def allocation_report(v1: bool = False, expert_scales: bool = False, norm: bool = False, y_dtype=None,
                      **fields) -> dict | str:
    """One dispatch + combine (V1 pair, V2 pair, or dispatch_v2 + combine_add_rms_norm) of a
    scenario on this rank; returns each op's arguments (tensors described) and its outputs'
    shapes and dtypes, for the test to compare with torch_npu's meta functions."""
    rank = this_rank().rank
    sc = Scenario(**fields)
    if rank not in sc.survivors():
        return "idle"
    kw = _dispatch_kwargs(sc, rank)
    if expert_scales:
        kw["expert_scales"] = torch.ones(kw["expert_ids"].shape, dtype=torch.float32)
    if y_dtype is not None:
        kw["y_dtype"] = y_dtype
    if v1:
        for name in V2_ONLY:
            kw.pop(name)
    args = _described(kw)
    outs = _call(emu.moe_distribute_dispatch if v1 else emu.moe_distribute_dispatch_v2, dict(kw))
    ck = _combine_kwargs(sc, rank, outs)
    if v1:
        for name in V2_ONLY + ("ori_x", "const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v"):
            ck.pop(name)
        ck.pop("assist_info_for_combine")
        ck["expand_idx"] = outs[2]
        pos = ["expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales", "group_ep", "ep_world_size",
               "ep_rank_id", "moe_expert_num"]
        combined = emu.moe_distribute_combine(*[ck.pop(n) for n in pos], **ck)
    elif norm:
        combined = _call(emu.moe_distribute_combine_add_rms_norm, _add_rms_norm_kwargs(ck))
    else:
        combined = _call(emu.moe_distribute_combine_v2, dict(ck))
    return {"dispatch": args, "dispatch_out": _outputs(outs), "combine_out": _outputs(combined),
            "bs": kw["expert_ids"].shape[0], "h": kw["x"].shape[1]}


_MARK = {"steady": 0}


def steady(fast_ranks: list[int], **fields) -> tuple:
    """:func:`scenario` with the steady path allowed on ``fast_ranks`` only (``EMU_FASTPATH``);
    returns its outputs and how many of this rank's op calls took the steady path."""
    with mock.patch.dict(os.environ, {"EMU_FASTPATH": "1" if this_rank().rank in fast_ranks else "0"}):
        n0 = current().steady_calls
        out = scenario(**fields)
        return out, current().steady_calls - n0


def warmed(target: str, fields: dict, fast: bool = True, **kw):
    """Two good dispatch + combine calls of the scenario ``fields`` as :func:`bad_call` makes them
    (later calls of their signatures take the steady path unless ``fast`` is False), then
    ``target(**kw, **fields)``; :func:`steady_since_warm` tells how many of target's calls were
    steady."""
    with mock.patch.dict(os.environ, {"EMU_FASTPATH": "1" if fast else "0"}):
        for _ in range(2):
            bad_call("combine", {}, **fields)
        _MARK["steady"] = current().steady_calls
        return globals()[target](**kw, **fields)


def steady_since_warm() -> int:
    return current().steady_calls - _MARK["steady"]


def gappy_mask_calls(calls: int, **fields) -> tuple[int, int, bool]:
    """Dispatch ``calls`` times with the mask [True, False, True, ...] after a warm-up with a prefix
    mask; returns (warnings seen, steady calls among them, every result equal to the prefix mask's)."""
    import warnings
    rank = this_rank().rank
    sc = Scenario(**fields)
    kw = _dispatch_kwargs(sc, rank)
    bs = kw["x"].shape[0]
    n = (bs + 1) // 2
    prefix = torch.arange(bs) < n
    gappy = torch.arange(bs) % 2 == 0
    with mock.patch.dict(os.environ, {"EMU_SOC": sc.soc}):
        want = [_call(emu.moe_distribute_dispatch_v2, dict(kw, x_active_mask=prefix)) for _ in range(2)][-1]
        n0, exact = current().steady_calls, True
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(calls):
                got = _call(emu.moe_distribute_dispatch_v2, dict(kw, x_active_mask=gappy))
                exact &= all(torch.equal(a, b) for a, b in zip(got, want))
    warned = sum("True-before-False" in str(w.message) for w in seen)
    return warned, current().steady_calls - n0, exact


def steady_v1(calls: int, **fields) -> tuple[bool, int]:
    """:func:`v1_matches_v2` ``calls`` times; returns whether every time matched and how many of
    this rank's op calls took the steady path."""
    n0 = current().steady_calls
    same = all([v1_matches_v2(**fields) for _ in range(calls)])
    return same, current().steady_calls - n0


def steady_add_rms_norm(calls: int, **kw) -> tuple[list[list[bool]], int]:
    """:func:`add_rms_norm_layer` ``calls`` times; returns its checks and how many of this rank's
    op calls took the steady path."""
    n0 = current().steady_calls
    checks = [add_rms_norm_layer(**kw) for _ in range(calls)]
    return checks, current().steady_calls - n0


def native(native_ranks: list[int], fast_ranks: list[int], **fields) -> tuple:
    """:func:`scenario` with the native accelerator on ``native_ranks`` only (``EMU_NATIVE``) and
    the steady path on ``fast_ranks``; returns its outputs and the accelerator's status here."""
    from emu.a3 import native as accel
    rank = this_rank().rank
    env = {"EMU_NATIVE": "1" if rank in native_ranks else "0", "EMU_FASTPATH": "1" if rank in fast_ranks else "0"}
    with mock.patch.dict(os.environ, env):
        return scenario(**fields), accel.status()


def phase_table() -> tuple:
    """scripts/phase_cost.py's measurement on a small point: the phases it saw (name -> calls per
    round trip), whether every cost is positive and the main thread's total covers the outermost
    phase, and whether every wrapped function is back where it was."""
    rows, total = phase_costs(dict(tp=1, bs=4, h=1024, k=2, quant=0), calls=6, warmup=2)
    seen = {name: calls for name, _, calls in rows}
    positive = all(us > 0 for _, us, _ in rows) and total * 1e3 >= max(us for _, us, _ in rows) / 2
    back = (CHIPS["A3"].steady.dispatch is a3_steady.dispatch and not hasattr(a3_steady.dispatch, "__wrapped__")
            and call.issue is transport.issue and not hasattr(transport.issue, "__wrapped__")
            and not hasattr(call.Call.exchange, "__wrapped__"))
    return seen, positive, back
