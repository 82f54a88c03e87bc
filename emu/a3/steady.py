"""The steady state of Atlas A3 dispatch and combine: a call like the last one that succeeded.

A decode loop calls an op with the same attributes, shapes and dtypes on the same group at
every step.  Once a call of the common form (below) has succeeded on the general path, what it
validated and where it ran are kept per (op, signature, environment): the validated call
(:class:`~emu.core.request.Prepared`) and its domains.  A later call of the same signature
then pays only for the checks on its data and for the data path:

    data checks   the general path's own id checks (``check_ids``) on the active slots (a 1-D
                  x_active_mask: the first n tokens, True before False); combine also the
                  rows it returns (their count within [0, A], V2's triples from a dispatch)
    plan          destination rank id // L, local expert id % L, wire order the ids' order
                  (stable): the general send plan of the active tokens when there are no
                  shared-expert ranks or special experts (with them, and for V1 combine,
                  whose rows come back by position, the general plan itself)
    open          the call's number on the kept domains
    phases        the general path's from the exchange on (``send_rows`` / ``return_rows``)

A data check that fails sends the call down the general path, which finds and reports the
error as it always does (same class, code, message and order): the steady path decides nothing
an error depends on, and peers cannot tell which path a rank took (the wire is the same).
Nothing is kept across an op call that raised (a peer may have abandoned a group meanwhile),
and nothing is used while a watcher, a tracer or jitter is on, or with ``EMU_FASTPATH=0``.

The common form: V2 or V1 dispatch and combine, or combine_add_rms_norm; any tp_world_size,
shared-expert ranks and zero / copy / const experts; no x_active_mask, or a 1-D one (a
2-D mask, or a 1-D one that is not True before False, takes the general path); no
elastic_info; dispatch without expert_scales; the EP and TP groups' ranks in ascending order.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from ..comm.call import Call
from ..comm.context import CommContext
from ..comm.domain import Domain
from ..comm.groups import resolve_group
from ..comm.header import MAX_ATTRS
from ..core.fastpath import ENV, Unhashable, enabled, env_values, signature
from ..core.checks import Checker, check_ids
from ..core.errors import AclnnError
from ..core.layout import DispatchOutputs
from ..core.plan import ActiveSet, active_set, send_counts, send_plan
from ..core.request import CombineRequest, DispatchRequest, Prepared, Request
from .combine import Returning, return_rows, route_back, tp_reduce_scatter
from .dispatch import WireRows, send_rows

KEY_ENV = ENV + ("EMU_FASTPATH", "EMU_TRANSPORT")
MAX_ENTRIES = 64
OPS = ("aclnnMoeDistributeDispatchV3", "aclnnMoeDistributeCombineV3",       # V2
       "aclnnMoeDistributeDispatch", "aclnnMoeDistributeCombine",            # V1
       "aclnnMoeDistributeCombineAddRmsNormV2")


@dataclass(frozen=True)
class Kept:
    """What a successful call of one signature leaves for the next: its validated call, the
    user's groups it ran on (weakly; no TP group: None), its EP and TP domains and the
    attributes its headers carry."""

    prep: Prepared
    group: weakref.ref
    dom: Domain
    attrs: tuple[tuple[str, int], ...]
    tp_group: weakref.ref | None = None
    tp: Domain | None = None


def _key(req: Request) -> Hashable | None:
    try:
        return req.kind, req.op, signature(req), env_values(KEY_ENV)
    except Unhashable:
        return None


def _common(req: Request, prep: Prepared, call: Call) -> bool:
    """The call has the common form (module docstring) and ran where a steady call would."""
    cfg, inp = req.cfg, req.inputs
    if req.op not in OPS or prep.algorithm:
        return False
    mask = inp.x_active_mask
    if (mask is not None and mask.dim() != 1) or inp.elastic_info is not None or call.extra:
        return False
    if call.ep.order is not None or prep.remap.active or (call.tp is not None) != (cfg.tp_world_size == 2):
        return False
    if call.tp is not None and call.tp.order is not None:
        return False
    return req.kind != "dispatch" or inp.expert_scales is None


def _usable(ctx: CommContext) -> bool:
    return not ctx.suspect and ctx.watcher is None and ctx.jitter is None and ctx.trace_sink() is None


def learn(req: Request, prep: Prepared, call: Call) -> None:
    """Keep what a call that just succeeded on the general path validated, when it has the
    common form (else nothing)."""
    ctx = call.ctx
    if not enabled() or not _usable(ctx) or not _common(req, prep, call):
        return
    key = _key(req)
    group = resolve_group(req.place.group_ep)
    tp_group = resolve_group(req.place.group_tp) if call.tp is not None else None
    if key is None or group is None or (call.tp is not None and tp_group is None):
        return
    if len(ctx.steady) >= MAX_ENTRIES:
        ctx.steady.clear()
    try:
        ctx.steady[key] = Kept(prep, weakref.ref(group), call.ep, call.attrs,
                               None if tp_group is None else weakref.ref(tp_group), call.tp)
    except TypeError:                           # an attribute of no hash: nothing kept
        pass


def _kept(req: Request, ctx: CommContext) -> Kept | None:
    """What an earlier call of this signature left, if this call may use it."""
    if not ctx.steady or not _usable(ctx):
        return None
    key = _key(req)
    try:
        kept = ctx.steady.get(key) if key is not None else None
    except TypeError:
        return None
    if kept is None or kept.group() is not resolve_group(req.place.group_ep):
        return None
    if kept.tp_group is not None and kept.tp_group() is not resolve_group(req.place.group_tp):
        return None
    return kept


def _open(ctx: CommContext, kept: Kept, kind: str) -> Call:
    """The call on the kept domain, numbered as ``open_call`` numbers it."""
    order, call_no = ctx.next_call(kept.dom.name, kind)
    ctx.steady_calls += 1
    headers = (["TP", "EP"] if kind == "combine" else ["EP", "TP"]) if kept.tp is not None else ["EP"]
    return Call(op=kind, ep=kept.dom, tp=kept.tp, attrs=kept.attrs[:MAX_ATTRS], ctx=ctx, call_no=call_no,
                order=order, clock_ns=time.monotonic_ns(), pending=headers)


def _active(mask: torch.Tensor | None, bs: int) -> int | None:
    """The active tokens, the first n: all without a mask, n = its True values for a 1-D mask
    that is True before False (None for another: the general path warns about it)."""
    if mask is None:
        return bs
    m = mask.numpy()
    n = int(np.count_nonzero(m))
    return n if m[:n].all() else None


def _ids_pass(req: Request, kept: Kept, act: ActiveSet) -> bool:
    """The ids of the active slots pass the data checks the general path runs on them
    (``check_ids``: MoE or special ids, no MoE expert twice in a token)."""
    geom = kept.prep.route
    try:
        check_ids(Checker(req.op), kept.prep.me, req.inputs.expert_ids, act.slots, geom.E, geom.E, geom.special)
    except AclnnError:
        return False
    return True


def dispatch(req: DispatchRequest, ctx: CommContext) -> tuple[DispatchOutputs, Call] | None:
    """A steady dispatch (None: this call takes the general path)."""
    kept = _kept(req, ctx)
    if kept is None:
        return None
    geom, inp = kept.prep.route, req.inputs
    bs, k = inp.expert_ids.shape
    n = _active(inp.x_active_mask, bs)
    if not n:
        return None
    act = active_set(bs, k, inp.x_active_mask)
    if not _ids_pass(req, kept, act):
        return None
    if geom.S or geom.special:                # the general plan of the active tokens
        plan = send_plan(geom, kept.prep.me, inp.expert_ids, act)
        rows = WireRows(plan.token, plan.slot, plan.local, plan.smooth_row, plan.counts)
    else:
        e = inp.expert_ids.numpy()[:n].reshape(-1).astype(np.int64)
        order = np.argsort(e, kind="stable")
        chosen = e[order]
        rows = WireRows(token=order // k, slot=order % k, local=chosen % geom.L, smooth_row=chosen,
                        counts=np.bincount(chosen // geom.L, minlength=geom.W).astype(np.int64))
    call = _open(ctx, kept, "dispatch")
    return send_rows(call, kept.prep, inp, rows), call


def combine(req: CombineRequest, ctx: CommContext) -> tuple[torch.Tensor, Call] | None:
    """A steady combine (None: this call takes the general path)."""
    kept = _kept(req, ctx)
    if kept is None:
        return None
    prep, inp = kept.prep, req.inputs
    geom = prep.route
    bs, k = inp.expert_ids.shape
    if not _active(inp.x_active_mask, bs):
        return None
    act = active_set(bs, k, inp.x_active_mask)
    blocks = geom.recv_blocks(prep.me)
    if not _ids_pass(req, kept, act) or blocks > inp.ep_send_counts.shape[0]:
        return None
    own = int(inp.ep_send_counts[blocks - 1])
    if not 0 <= own <= prep.shapes.capacity:
        return None
    if inp.positional:                        # V1: rows go back by position, matched to this rank's plan
        plan = send_plan(geom, prep.me, inp.expert_ids, act)
        tri, expected = route_back(geom, prep.me, inp, own), plan.counts
    else:
        tri = inp.assist_info[:3 * own].numpy().reshape(own, 3)
        slots = geom.K + geom.Ns
        if own and not (int(tri.min()) >= 0 and int(tri[:, 0].max()) < geom.W and int(tri[:, 2].max()) < slots):
            return None
        plan, tri = None, tri.astype(np.int64)
        expected = send_counts(geom, prep.me, inp.expert_ids, act)
    call = _open(ctx, kept, "combine")
    y = tp_reduce_scatter(call, geom, inp, own) if geom.tp_active else inp.expand_x[:own]
    return return_rows(call, prep, inp, Returning(y, tri, plan, expected, act)), call
