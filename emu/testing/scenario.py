"""Reproducible scenarios: one seed gives every rank's inputs, so each rank (and the
single-process reference) can build the whole world's data without communicating.

A scenario runs dispatch -> a per-expert function -> combine, on this rank through the
public API (:func:`run_rank`) or for the whole world in one process (:func:`run_reference`).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from unittest import mock

import torch
import torch.distributed as dist

from ..api import moe_distribute_combine_v2, moe_distribute_dispatch_v2
from ..core.attrs import Geometry, MoeConfig
from ..core.inputs import CombineInputs, DispatchInputs, SpecialExperts
from ..core.layout import DispatchOutputs, lazy_zeros
from ..core.placement import Remap
from ..core.soc import a2_comm_alg
from ..reference import a2 as ref_a2
from ..reference.a3 import reference_combine, reference_dispatch, tp_span

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Scenario:
    """A whole-world configuration; every field has a flag in launch/dispatch.py."""

    ep: int = 8
    tp: int = 0                     # tp_world_size attribute (0, 1 or 2)
    moe: int = 7
    shared: int = 1                 # shared_expert_num
    shared_ranks: int = 1           # shared_expert_rank_num
    bs: int = 8
    h: int = 7168
    k: int = 3
    quant: int = 0
    smooth: bool = False            # pass smooth scales with quant 2
    comm_quant: int = 0
    mask: str = "none"              # none | 1d | 2d
    global_bs: int = 0
    uneven: bool = False            # rank r gets Bs - (r % 3) tokens (needs global_bs)
    token_nums_type: int = 1
    dtype: str = "bf16"
    zero: int = 0
    copy: int = 0
    const: int = 0
    special_frac: float = 0.0       # share of slots sent to special experts
    shared_x: bool = False          # pass shared_expert_x to combine (S == 0 only)
    seed: int = 0
    calls: int = 1                  # dispatch+combine pairs per run (same data)
    removed: str = ""               # EP ranks removed by elastic scaling, e.g. "2,3,4,5"
    elastic_flag0: bool = False     # pass elastic_info with flag 0 (tables ignored)
    data: str = "random"            # random | doc (x = 1, ids 0..K-1, weights 0.1: the operator doc's data)
    experts: str = "scaled"         # scaled (row * (1 + e/64)) | identity
    soc: str = "A3"                 # A3 | A2 (A2: no shared experts, TP, elastic or special experts)
    comm_alg: str = ""              # A2: fullmesh | hierarchy | "" (HCCL environment decides)

    def config(self) -> MoeConfig:
        return MoeConfig(ep_world_size=self.ep, moe_expert_num=self.moe, tp_world_size=self.tp,
                         shared_expert_num=self.shared, shared_expert_rank_num=self.shared_ranks,
                         quant_mode=self.quant, global_bs=self.effective_global_bs,
                         expert_token_nums_type=self.token_nums_type, comm_quant_mode=self.comm_quant,
                         zero_expert_num=self.zero, copy_expert_num=self.copy, const_expert_num=self.const)

    @property
    def effective_global_bs(self) -> int:
        return self.global_bs or (self.bs * self.ep if self.uneven else 0)

    @property
    def hierarchy(self) -> bool:
        """An A2 scenario that asks for the hierarchy path by name."""
        return self.soc == "A2" and self.comm_alg == "hierarchy"

    @property
    def world_size(self) -> int:
        return self.ep * tp_span(self.config())

    @property
    def xt(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def removed_ranks(self) -> list[int]:
        return sorted({int(r) for r in self.removed.split(",") if r.strip()})

    def survivors(self) -> list[int]:
        """World ranks that call the op (all of them unless ranks are removed)."""
        gone = set(self.removed_ranks())
        return [g for g in range(self.world_size) if g // tp_span(self.config()) not in gone]

    @property
    def moe_now(self) -> int:
        """E' under elastic scaling (same experts per MoE rank on the survivors), else E."""
        if not self.removed_ranks():
            return self.moe
        local = self.moe // (self.ep - self.shared_ranks)
        return local * (len(self.survivors()) - self.shared_ranks)

    def elastic_info(self) -> torch.Tensor | None:
        """elastic_info for this scenario (int32, 4 + 2*ep), or None.  Survivors keep their
        order: new id i = the i-th surviving EP rank (the doc's convention)."""
        gone = self.removed_ranks()
        if not gone and not self.elastic_flag0:
            return None
        alive = [r for r in range(self.ep) if r not in gone]
        to_new = [-1] * self.ep
        for i, r in enumerate(alive):
            to_new[r] = i
        to_old = alive + [-1] * (self.ep - len(alive))
        flag = 0 if self.elastic_flag0 and not gone else 1
        return torch.tensor([flag, len(alive), self.shared_ranks, self.moe_now] + to_new + to_old,
                            dtype=torch.int32)

    def rank_bs(self, ep_rank: int) -> int:
        return max(1, self.bs - ep_rank % 3) if self.uneven else self.bs

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RankData:
    """Everything one world rank passes to dispatch and combine (besides expert outputs):
    dispatch's tensors, combine's weights, special experts and shared_expert_x."""

    dispatch: DispatchInputs
    expert_scales: torch.Tensor                      # (Bs, K) fp32
    special: SpecialExperts = SpecialExperts()
    shared_expert_x: torch.Tensor | None = None


def make_rank_data(sc: Scenario, world_rank: int) -> RankData:
    """Inputs of ``world_rank``, a pure function of (scenario, world_rank).

    MoE ids are drawn from [0, E') (E' = E unless elastic), special ids from
    [E, E + zero + copy + const) with the original E (docs/elastic.md)."""
    T = tp_span(sc.config())
    ep_rank = world_rank // T
    g = torch.Generator().manual_seed(sc.seed * 1_000_003 + world_rank)
    bs, k, h, xt = sc.rank_bs(ep_rank), sc.k, sc.h, sc.xt
    special = sc.zero + sc.copy + sc.const
    if sc.data == "doc":
        x = torch.ones(bs, h, dtype=xt)
        ids = (torch.arange(k, dtype=torch.int32) % sc.moe_now).repeat(bs, 1)
        if special and sc.special_frac > 0:                # odd tokens: last slot to a special expert
            odd = torch.arange(bs) % 2 == 1
            ids[odd, k - 1] = sc.moe + (torch.arange(bs, dtype=torch.int32)[odd] // 2) % special
        expert_scales = torch.full((bs, k), 0.1, dtype=torch.float32)
    else:
        x = torch.randn(bs, h, generator=g).to(xt)
        ids = torch.rand(bs, sc.moe_now, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
        if special and sc.special_frac > 0:
            pick = torch.rand(bs, k, generator=g) < sc.special_frac
            ids = torch.where(pick, sc.moe + torch.randint(0, special, (bs, k), generator=g).to(torch.int32), ids)
        expert_scales = torch.rand(bs, k, generator=g).to(torch.float32)
    mask = None
    if sc.mask == "1d":
        n = int(torch.randint(0, bs + 1, (1,), generator=g))
        mask = torch.arange(bs) < n
    elif sc.mask == "2d":
        mask = torch.rand(bs, k, generator=g) < 0.7
    scales = None
    if sc.quant == 2 and sc.smooth:
        ns = sc.config().shared_num
        scales = (torch.rand(ns + sc.moe, h, generator=g) + 0.5).to(torch.float32)
    ori_x = alpha1 = alpha2 = const_v = shared_x = None
    if sc.copy or sc.const:
        ori_x = x.clone() if sc.data == "doc" else torch.randn(bs, h, generator=g).to(xt)
    if sc.const:
        alpha1 = torch.rand(sc.const, generator=g).to(xt)
        alpha2 = torch.rand(sc.const, generator=g).to(xt)
        const_v = torch.randn(sc.const, h, generator=g).to(xt)
    if sc.shared_x:
        shared_x = torch.randn(bs, h, generator=g).to(xt)
    return RankData(dispatch=DispatchInputs(x=x, expert_ids=ids, scales=scales, x_active_mask=mask),
                    expert_scales=expert_scales, special=SpecialExperts.of(sc.config(), ori_x, alpha1, alpha2, const_v),
                    shared_expert_x=shared_x)


def expert_outputs(sc: Scenario, geom: Geometry, ep_rank: int, out: DispatchOutputs) -> torch.Tensor:
    """The per-expert function: row i of expand_x -> XT(dequantised row * (1 + e/64)), where
    e is the row's expert (global MoE id, or -1 - j for shared expert j; factor 1 with
    ``experts="identity"``); ``geom``/``ep_rank`` are the routing geometry and logical id; halved with tp 2
    (each TP rank holds half of the expert, combine adds the halves).  Rows past the valid
    counts stay zero.  Returns (rows, H) XT, the expand_x that combine takes."""
    W = geom.W
    rows = out.expand_x.shape[0]
    n_own = int(out.ep_recv_counts[geom.recv_blocks(ep_rank) - 1])
    n_peer = int(out.ep_recv_counts[2 * W - 1]) if geom.tp_active else 0
    factor = torch.zeros(rows, dtype=torch.float32)
    if geom.is_shared(ep_rank):
        e = torch.full((n_own + n_peer,), -1 - ep_rank // geom.R, dtype=torch.float32)
    else:
        cum = out.ep_recv_counts[:W * geom.L].view(geom.L, W)[:, -1].to(torch.int64)
        local = torch.bucketize(torch.arange(n_own), cum, right=True)
        e = ((ep_rank - geom.S) * geom.L + local).to(torch.float32)
        e = torch.cat([e, torch.full((n_peer,), float((ep_rank - geom.S) * geom.L))])
    n = n_own + n_peer
    factor[:n] = 1 + e / 64 if sc.experts == "scaled" else 1.0
    if geom.tp_active:
        factor = factor * 0.5
    vals = out.expand_x[:n].to(torch.float32)
    if out.expand_x.dtype == torch.int8:
        vals = vals * out.dynamic_scales[:n, None]
    y = lazy_zeros(tuple(out.expand_x.shape), sc.xt)
    y[:n] = (vals * factor[:n, None]).to(sc.xt)
    return y


def combine_inputs(sc: Scenario, data: RankData, out: DispatchOutputs, y: torch.Tensor) -> CombineInputs:
    """Combine's bundle for expert outputs ``y`` of dispatch outputs ``out`` (A2 hierarchy:
    with expand_scales)."""
    return CombineInputs(expand_x=y, expert_ids=data.dispatch.expert_ids,
                         assist_info=out.assist_info_for_combine, ep_send_counts=out.ep_recv_counts,
                         expert_scales=data.expert_scales,
                         tp_send_counts=out.tp_recv_counts if sc.tp == 2 else None,
                         x_active_mask=data.dispatch.x_active_mask,
                         expand_scales=out.expand_scales if sc.hierarchy else None,
                         shared_expert_x=data.shared_expert_x, special=data.special,
                         elastic_info=sc.elastic_info())


def dispatch_kwargs(sc: Scenario, world_rank: int, group_ep, group_tp, inp: DispatchInputs) -> dict:
    """torch_npu keyword arguments of this rank's dispatch (every argument by name)."""
    return dict(x=inp.x, expert_ids=inp.expert_ids, scales=inp.scales, x_active_mask=inp.x_active_mask,
                expert_scales=inp.expert_scales, elastic_info=inp.elastic_info,
                performance_info=inp.performance_info, quant_mode=sc.quant,
                expert_token_nums_type=sc.token_nums_type, **_attribute_kwargs(sc, world_rank, group_ep, group_tp))


def combine_kwargs(sc: Scenario, world_rank: int, group_ep, group_tp, inp: CombineInputs) -> dict:
    """torch_npu keyword arguments of this rank's combine (every argument by name)."""
    sp = inp.special
    return dict(expand_x=inp.expand_x, expert_ids=inp.expert_ids, assist_info_for_combine=inp.assist_info,
                ep_send_counts=inp.ep_send_counts, expert_scales=inp.expert_scales,
                tp_send_counts=inp.tp_send_counts, x_active_mask=inp.x_active_mask,
                expand_scales=inp.expand_scales, shared_expert_x=inp.shared_expert_x, elastic_info=inp.elastic_info,
                ori_x=sp.ori_x, const_expert_alpha_1=sp.alpha1, const_expert_alpha_2=sp.alpha2,
                const_expert_v=sp.v, performance_info=inp.performance_info, comm_quant_mode=sc.comm_quant,
                **_attribute_kwargs(sc, world_rank, group_ep, group_tp))


def _attribute_kwargs(sc: Scenario, world_rank: int, group_ep, group_tp) -> dict:
    """The attributes and groups both ops take."""
    ep_rank, tp_rank = divmod(world_rank, tp_span(sc.config()))
    return dict(group_ep=group_ep, ep_world_size=sc.ep, ep_rank_id=ep_rank, moe_expert_num=sc.moe,
                group_tp=group_tp, tp_world_size=sc.tp, tp_rank_id=tp_rank, shared_expert_num=sc.shared,
                shared_expert_rank_num=sc.shared_ranks, global_bs=sc.effective_global_bs,
                zero_expert_num=sc.zero, copy_expert_num=sc.copy, const_expert_num=sc.const, comm_alg=sc.comm_alg)


def route(sc: Scenario, ep_rank: int) -> tuple[Geometry, int]:
    """Routing geometry and logical id of EP rank ``ep_rank`` (new id space when elastic)."""
    geom = Geometry.of(sc.config(), sc.rank_bs(ep_rank), sc.k, sc.h)
    info = sc.elastic_info()
    if info is None:
        return geom, ep_rank
    remap = Remap.parse(info, sc.ep)
    return remap.routing(geom), int(remap.to_new[ep_rank]) if remap.active else ep_rank


@dataclass
class RankResult:
    """What one rank produced: the dispatch 7-tuple, x_out, and optional timing."""

    dispatch: tuple
    x_out: torch.Tensor
    seconds: dict = field(default_factory=dict)


def run_reference(sc: Scenario) -> list[RankResult | None]:
    """The whole world in one process; list indexed by world rank (None for removed ranks)."""
    if sc.soc == "A2":
        return _run_reference_a2(sc)
    cfg = sc.config()
    T = tp_span(cfg)
    info = sc.elastic_info()
    alive = set(sc.survivors())
    data = [make_rank_data(sc, g) if g in alive else None for g in range(sc.world_size)]
    outs = reference_dispatch(cfg, [d.dispatch if d is not None else None for d in data], info)
    comb: list[CombineInputs | None] = [None] * sc.world_size
    for g in alive:
        geom, me = route(sc, g // T)
        comb[g] = combine_inputs(sc, data[g], outs[g], expert_outputs(sc, geom, me, outs[g]))
    x_outs = reference_combine(cfg, comb, info)
    return [RankResult(dispatch=outs[g].as_tuple(), x_out=x_outs[g]) if g in alive else None
            for g in range(sc.world_size)]


def _run_reference_a2(sc: Scenario) -> list[RankResult]:
    cfg = sc.config()
    data = [make_rank_data(sc, g) for g in range(sc.world_size)]
    if sc.hierarchy:
        outs = ref_a2.reference_dispatch_hierarchy(cfg, [d.dispatch for d in data], [d.expert_scales for d in data])
    else:
        outs = ref_a2.reference_dispatch_a2(cfg, [d.dispatch for d in data])
    comb = [combine_inputs(sc, data[g], outs[g], expert_outputs(sc, route(sc, g)[0], g, outs[g]))
            for g in range(sc.world_size)]
    if sc.hierarchy:
        x_outs = ref_a2.reference_combine_hierarchy(cfg, comb, [o.expand_scales for o in outs])
    else:
        x_outs = ref_a2.reference_combine_a2(cfg, comb)
    return [RankResult(dispatch=outs[g].as_tuple(), x_out=x_outs[g]) for g in range(sc.world_size)]


def run_rank(sc: Scenario, world_rank: int, group_ep, group_tp="") -> RankResult:
    """This rank's part of the scenario through the public API (``sc.calls`` times), with
    EMU_SOC set to the scenario's chip for the duration."""
    with mock.patch.dict(os.environ, {"EMU_SOC": sc.soc}):
        return _run_rank(sc, world_rank, group_ep, group_tp)


def _run_rank(sc: Scenario, world_rank: int, group_ep, group_tp="") -> RankResult:
    ep_rank = world_rank // tp_span(sc.config())
    data = make_rank_data(sc, world_rank)
    geom, me = route(sc, ep_rank)
    perf = torch.zeros(sc.ep, dtype=torch.int64)
    hier = sc.soc == "A2" and a2_comm_alg(sc.comm_alg, "scenario") == "hierarchy"   # the env may choose
    inp = replace(data.dispatch, elastic_info=sc.elastic_info(), performance_info=perf,
                  expert_scales=data.expert_scales if hier else None)
    result = None
    for _ in range(sc.calls):
        t0 = time.perf_counter()
        outs = moe_distribute_dispatch_v2(**dispatch_kwargs(sc, world_rank, group_ep, group_tp, inp))
        t1 = time.perf_counter()
        out = DispatchOutputs(*outs)
        ci = replace(combine_inputs(sc, data, out, expert_outputs(sc, geom, me, out)), performance_info=perf,
                     expand_scales=out.expand_scales if hier else None)
        x_out = moe_distribute_combine_v2(**combine_kwargs(sc, world_rank, group_ep, group_tp, ci))
        t2 = time.perf_counter()
        result = RankResult(dispatch=outs, x_out=x_out,
                            seconds={"dispatch": t1 - t0, "combine": t2 - t1, "wait_us": perf.tolist()})
    return result


OUTPUT_NAMES = ("expand_x", "dynamic_scales", "assist_info_for_combine", "expert_token_nums",
                "ep_recv_counts", "tp_recv_counts", "expand_scales")


def compare(got: RankResult, want: RankResult) -> list[str]:
    """Names of the outputs that differ (shape, dtype or any bit); [] when identical."""
    bad = []
    for name, a, b in zip(OUTPUT_NAMES + ("x_out",), list(got.dispatch) + [got.x_out],
                          list(want.dispatch) + [want.x_out]):
        if a.shape != b.shape or a.dtype != b.dtype:
            bad.append(f"{name}: {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.numel() else a,
                             b.view(torch.uint8) if b.dtype.is_floating_point and b.numel() else b):
            bad.append(name)
    return bad


def digests(res: RankResult) -> dict[str, str]:
    """Every output's shape, dtype and a SHA-1 of its bytes: what :func:`compare` compares, small
    enough for the rendezvous store (one rank computes the reference, every rank checks)."""
    out = {}
    for name, a in zip(OUTPUT_NAMES + ("x_out",), list(res.dispatch) + [res.x_out]):
        raw = a.detach().contiguous().view(-1).view(torch.uint8).numpy() if a.numel() else b""
        out[name] = f"{tuple(a.shape)} {a.dtype} {hashlib.sha1(raw).hexdigest()}"
    return out


def compare_digests(got: RankResult, want: dict[str, str]) -> list[str]:
    """:func:`compare` against the reference's digests."""
    bad = []
    for name, d in digests(got).items():
        if d != want[name]:
            shape_dtype, want_sd = d.rsplit(" ", 1)[0], want[name].rsplit(" ", 1)[0]
            bad.append(name if shape_dtype == want_sd else f"{name}: {shape_dtype} != {want_sd}")
    return bad


def summary(sc: Scenario, world_rank: int, got: RankResult, diff: list[str]) -> dict:
    """One printable row about what ``world_rank`` received and combined (JSON-friendly)."""
    geom, me = route(sc, world_rank // tp_span(sc.config()))
    out = DispatchOutputs(*got.dispatch)
    counts = out.ep_recv_counts[:geom.recv_blocks(me)].tolist()
    n = int(counts[-1]) if counts else 0
    if sc.hierarchy:                                     # no assist; the weights travel with the rows
        triples = "w " + str([round(float(v), 3) for v in out.expand_scales[:3]])
    elif sc.soc == "A2":                                 # A2 fullmesh: the occurrence index
        triples = "occ " + str(out.assist_info_for_combine[:6].tolist())
    else:
        tri = out.assist_info_for_combine[:3 * min(n, 3)].view(-1, 3).tolist()
        triples = " ".join("(%d,%d,%d)" % tuple(t) for t in tri) + (" ..." if n > 3 else "")
    return dict(rank=world_rank, id=me, role="shared" if geom.is_shared(me) else "moe",
                token_nums=out.expert_token_nums.tolist(),
                counts=str(counts[:5])[:-1] + (", ...]" if len(counts) > 5 else "]"),
                triples=triples,
                x_out=[round(float(v), 6) for v in got.x_out[0, :3].float()] if got.x_out.numel() else [],
                ms=1e3 * (got.seconds.get("dispatch", 0) + got.seconds.get("combine", 0)),
                ok=not diff, verdict="OK (bit-exact)" if not diff else "MISMATCH " + ", ".join(diff))


def rank_groups(sc: Scenario):
    """Create this scenario's EP and TP groups on every world rank (docs/dispatch.md convention).

    Returns (ep_group, tp_group or None) for the calling rank; every rank must call it.
    """
    T = tp_span(sc.config())
    me = dist.get_rank()
    ep_group = tp_group = None
    for i in range(T):
        g = dist.new_group([e * T + i for e in range(sc.ep)]) if T > 1 else dist.group.WORLD
        if me % T == i:
            ep_group = g
    if T > 1:
        for e in range(sc.ep):
            g = dist.new_group([e * T, e * T + 1])
            if me // T == e:
                tp_group = g
    return ep_group, tp_group


__all__ = ["Scenario", "make_rank_data", "run_reference", "run_rank", "compare", "rank_groups"]
