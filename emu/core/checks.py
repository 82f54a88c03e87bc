"""Checks shared by every chip: the checker, the aclnn wrapper's null / dtype layers, the
emulator's data checks on expert ids and elastic tables (docs/elastic.md, docs/errors.md), and turning a
checked request into :class:`~emu.core.request.Prepared`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attrs import Geometry, MoeConfig
from .errors import PARAM_INVALID, PARAM_NULLPTR, TILING_ERROR, AclnnError
from .inputs import DispatchInputs, dtype_code, npu_dtype
from .layout import DispatchShapes, allocation_mode, dispatch_shapes
from .placement import Remap, identity_remap
from .plan import ActiveSet
from .request import CombineRequest, DispatchRequest, Prepared, Request, agreed_attributes

XT_DTYPES = (torch.bfloat16, torch.float16)


class Checker:
    """Raises AclnnError(code) naming the parameter, its value and the rule."""

    def __init__(self, op: str):
        self.op = op

    def need(self, ok: bool, code: int, param: str, value, rule: str) -> None:
        if not ok:
            raise AclnnError(code, f"{self.op}: {param}={value!r} violates: {rule}")

    def not_null(self, tensor, param: str, code: int = PARAM_NULLPTR) -> None:
        self.need(tensor is not None, code, param, None, "required tensor must not be null")

    def dtype(self, tensor, param: str, allowed: tuple[torch.dtype, ...], code: int = PARAM_INVALID) -> None:
        if tensor is not None and tensor.dtype not in allowed:          # messages only on failure
            self.need(False, code, f"{param}.dtype", tensor.dtype, f"dtype must be one of {[str(d) for d in allowed]}")

    def dim(self, tensor, param: str, dims: tuple[int, ...]) -> None:
        if tensor is not None and tensor.dim() not in dims:
            self.need(False, TILING_ERROR, f"{param}.dim()", tensor.dim(), f"must be {' or '.join(map(str, dims))}-D")

    def tiling(self, ok: bool, param: str, value, rule: str) -> None:
        self.need(ok, TILING_ERROR, param, value, rule)


def dispatch_wrapper_checks(c: Checker, req: DispatchRequest, tp_name: str) -> None:
    """Layers 1 and 2 of dispatch, the same on A3 and A2: null tensors and group names (161001),
    then dtypes outside the compiled variants (161002)."""
    inp, ep_name = req.inputs, req.place.ep_name
    c.not_null(inp.x, "x")
    c.not_null(inp.expert_ids, "expert_ids")
    c.need(bool(ep_name), PARAM_NULLPTR, "group_ep", ep_name, "must be a non-empty group name")
    c.need(len(ep_name) < 128, PARAM_NULLPTR, "group_ep", ep_name, "name must be shorter than 128 chars")
    c.need(len(tp_name) < 128, PARAM_NULLPTR, "group_tp", tp_name, "name must be shorter than 128 chars")
    c.dtype(inp.x, "x", XT_DTYPES)
    c.dtype(inp.expert_ids, "expert_ids", (torch.int32,))
    c.dtype(inp.scales, "scales", (torch.float32,))
    c.dtype(inp.x_active_mask, "x_active_mask", (torch.bool,))
    declared_dtypes(c, inp)


def declared_dtypes(c: Checker, inp: DispatchInputs) -> None:
    """torch_npu 2.14's y_dtype / x_dtype / scales_dtype (161002 outside the compiled variants:
    x bf16 / fp16, scales fp32, expand_x x's dtype or int8)."""
    d = inp.dtypes
    for value, name, allowed in ((d.x, "x_dtype", XT_DTYPES), (d.scales, "scales_dtype", (torch.float32,)),
                                 (d.y, "y_dtype", (inp.x.dtype, torch.int8))):
        if value is not None:
            got = npu_dtype(value)
            c.need(got in allowed, PARAM_INVALID, name, value, f"must name one of {_named(allowed)}")


def _named(dtypes: tuple[torch.dtype, ...]) -> str:
    """"15 (bfloat16), 5 (float16)": codes with their names."""
    return ", ".join(f"{dtype_code(d)} ({str(d).replace('torch.', '')})" for d in dtypes)


def expand_x_dtype_rule(c: Checker, cfg: MoeConfig, inp: DispatchInputs) -> None:
    """Tiling's expand_x rule on a declared ``y_dtype``: int8 with quant_mode 2, x's dtype with 0."""
    if inp.dtypes.y is not None:
        want = torch.int8 if cfg.quant_mode else inp.x.dtype
        c.tiling(npu_dtype(inp.dtypes.y) == want, "y_dtype", inp.dtypes.y,
                 f"expand_x must be {want} with quant_mode={cfg.quant_mode}")


def combine_wrapper_checks(c: Checker, req: CombineRequest, tp_name: str, assist_name: str) -> None:
    """Layer 1 of combine and its first dtype rule, the same on A3 and A2: null tensors and
    group names (161001; a group name >= 128 chars is 161002 in combine), expand_x bf16/fp16."""
    inp, ep_name = req.inputs, req.place.ep_name
    for t, name in ((inp.expand_x, "expand_x"), (inp.expert_ids, "expert_ids"), (inp.assist_info, assist_name),
                    (inp.ep_send_counts, "ep_send_counts"), (inp.expert_scales, "expert_scales")):
        c.not_null(t, name)
    c.need(bool(ep_name), PARAM_NULLPTR, "group_ep", ep_name, "must be a non-empty group name")
    c.need(len(ep_name) < 128, PARAM_INVALID, "group_ep", ep_name, "name must be shorter than 128 chars")
    c.need(len(tp_name) < 128, PARAM_INVALID, "group_tp", tp_name, "name must be shorter than 128 chars")
    c.dtype(inp.expand_x, "expand_x", XT_DTYPES)


def check_ids(c: Checker, rank: int, expert_ids: torch.Tensor, slots: np.ndarray, moe_now: int,
              moe_orig: int, special: int) -> None:
    """Emulator data checks (docs/errors.md): id ranges and duplicate MoE ids in a token's row.

    Valid ids: MoE ``[0, moe_now)`` (E' under elastic scaling) and, with special experts,
    ``[moe_orig, moe_orig + special)`` (the ORIGINAL E, docs/elastic.md).  ``slots``: (Bs, K) bool, the
    active slots; inactive slots are never read by the kernel.
    """
    ids = expert_ids.detach().cpu().numpy()
    every = bool(slots.all())
    if not special and ids.size:             # the common case: min and max of the active ids
        act = ids if every else np.where(slots, ids, 0)
        in_range = int(act.min()) >= 0 and int(act.max()) < moe_now
    else:
        in_range = not ids.size
    if not in_range:
        ok = (ids >= 0) & (ids < moe_now)
        if special:
            ok |= (ids >= moe_orig) & (ids < moe_orig + special)
        bad = slots & ~ok
        if bad.any():
            t, k = map(int, np.argwhere(bad)[0])
            v = int(ids[t, k])
            if moe_now < moe_orig and moe_now <= v < moe_orig:
                rule = (f"ids in [E'={moe_now}, E={moe_orig}) are dropped by dispatch but awaited by combine "
                        f"under elastic scaling")
            elif special:
                rule = (f"ids must be in [0, {moe_now}) or in the special range [{moe_orig}, {moe_orig + special})")
            else:
                rule = f"ids must be in [0, {moe_now})"
            c.tiling(False, f"expert_ids[{t}, {k}] on EP rank {rank}", v, rule)
    if ids.shape[1] < 2:
        return
    valid = slots if in_range else slots & (ids >= 0) & (ids < moe_now)
    moe = ids if in_range and every else np.where(valid, ids, -1 - np.arange(ids.shape[1])[None, :])
    srt = np.sort(moe, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        t = int(np.argwhere(dup)[0][0])
        c.tiling(False, f"expert_ids[{t}] on EP rank {rank}", ids[t].tolist(),
                 "a token may not choose the same MoE expert twice")


def check_remap(c: Checker, remap: Remap, cfg: MoeConfig, ep_rank_id: int) -> None:
    """Consistency of an active elastic table (emulator checks; the hardware trusts it)."""
    W, ns = cfg.ep_world_size, cfg.shared_num
    w2, s2, e2 = remap.new_world, remap.new_shared, remap.new_moe
    c.tiling(1 <= w2 <= W, "elastic_info[1] (W')", w2, f"must be in [1, ep_world_size={W}]")
    c.tiling(0 <= s2 < w2, "elastic_info[2] (S')", s2, f"must be in [0, W'={w2})")
    c.tiling((ns == 0) == (s2 == 0) and (ns == 0 or s2 % ns == 0), "elastic_info[2] (S')", s2,
             f"must be a non-zero multiple of shared_expert_num={ns} (or 0 when it is 0)")
    c.tiling(0 < e2 <= cfg.moe_expert_num and e2 % (w2 - s2) == 0, "elastic_info[3] (E')", e2,
             f"must be in (0, moe_expert_num={cfg.moe_expert_num}] and a multiple of W' - S' = {w2 - s2}")
    local = cfg.moe_expert_num // (W - cfg.shared_expert_rank_num)
    c.tiling(e2 // (w2 - s2) == local, "elastic_info[3] (E')", e2,
             f"must keep {local} MoE experts per MoE rank (the doc requires L' == L)")
    me = int(remap.to_new[ep_rank_id])
    c.tiling(0 <= me < w2, f"elastic_info[4 + {ep_rank_id}]", me,
             "this rank is removed by the elastic table: removed ranks must not call the op")
    c.tiling(_tables_agree(remap, W), "elastic_info tables", remap.to_new.tolist() + remap.to_old.tolist(),
             "table 1 (rank -> new id) and table 2 (new id -> rank) must be inverse permutations of the W' survivors")


def _tables_agree(remap: Remap, world: int) -> bool:
    """Table 1 (rank -> new id) and table 2 (new id -> rank) are inverse permutations of W' survivors."""
    w2, old = remap.new_world, remap.survivors()
    return bool(((old >= 0) & (old < world)).all()) and len(set(old.tolist())) == w2 \
        and bool((remap.to_new[old] == np.arange(w2)).all()) and int((remap.to_new >= 0).sum()) == w2


def usable_remap(elastic: torch.Tensor | None, world: int, ep_rank_id: int) -> Remap | None:
    """The remap a call runs on, read from ``elastic_info``'s structure alone: identity for None
    or flag 0; the survivors and this rank's new id of an active table.  None when no EP domain
    can be read from it (not a 1-D integer table of 4 + 2*W entries, W' out of range, tables that
    are not inverse permutations, this rank removed).  Its dtype and values (E', S', ...) are
    checked with the rest of the input: a rank whose table fails those still knows its domain,
    so it tells its peers instead of leaving them waiting."""
    if elastic is None:
        return identity_remap(world)
    ok = (isinstance(elastic, torch.Tensor) and elastic.dim() == 1 and not elastic.is_floating_point()
          and not elastic.is_complex() and elastic.shape[0] == 4 + 2 * world and 0 <= ep_rank_id < world)
    if not ok:
        return None
    remap = Remap.parse(elastic, world)
    if not remap.active:
        return remap
    if not 1 <= remap.new_world <= world or not _tables_agree(remap, world):
        return None
    return remap if 0 <= int(remap.to_new[ep_rank_id]) < remap.new_world else None


@dataclass(frozen=True)
class Static:
    """What a call's static checks derive from its signature (:mod:`emu.core.fastpath`): the
    geometry, torch_npu's output sizes and the chip's algorithm."""

    geom: Geometry
    shapes: DispatchShapes
    algorithm: str = ""
    agreed: tuple[tuple[str, int], ...] | None = None     # without an elastic table: they follow from the rest


def sized(req: Request, geom: Geometry, algorithm: str = "") -> Static:
    """The last static checks, after the chip's: torch_npu's output sizes and (dispatch) tiling's
    rules on them (docs/errors.md)."""
    elastic, ep_rank_id = req.inputs.elastic_info is not None, req.place.ep_rank_id
    dispatch = req.kind == "dispatch"
    shapes = dispatch_shapes(geom, ep_rank_id, req.inputs.expert_ids.shape[0], elastic=elastic,
                             expert_scales=dispatch and req.inputs.expert_scales is not None, v1=dispatch and req.v1,
                             graph=allocation_mode() == "graph")
    if dispatch:
        check_allocation(Checker(req.op), geom, ep_rank_id, shapes, elastic)
    agreed = None if elastic else agreed_attributes(req.kind, req.cfg, geom, req.activation.dtype, None)
    return Static(geom, shapes, algorithm, agreed)


def prepare(req: Request, st: Static, xt: torch.dtype, act: ActiveSet) -> Prepared:
    """The data checks after the static ones (the elastic table's values when active, then the
    ids; docs/elastic.md, docs/errors.md) and the validated call they give."""
    cfg, inp, ep_rank_id = req.cfg, req.inputs, req.place.ep_rank_id
    elastic = inp.elastic_info
    c = Checker(req.op)
    remap = Remap.parse(elastic, cfg.ep_world_size) if elastic is not None else identity_remap(cfg.ep_world_size)
    if remap.active:
        check_remap(c, remap, cfg, ep_rank_id)
    me = int(remap.to_new[ep_rank_id]) if remap.active else ep_rank_id
    check_ids(c, me, inp.expert_ids, act.slots, remap.new_moe if remap.active else cfg.moe_expert_num,
              cfg.moe_expert_num, cfg.special_num)
    return Prepared(cfg=cfg, geom=st.geom, xt=xt, remap=remap, shapes=st.shapes, act=act, me=me,
                    agreed=st.agreed if st.agreed is not None and xt == req.activation.dtype
                    else agreed_attributes(req.kind, cfg, st.geom, xt, elastic), algorithm=st.algorithm)


def check_allocation(c: Checker, geom: Geometry, rank: int, shapes: DispatchShapes, elastic: bool) -> None:
    """Tiling's output-size rules on the buffers torch_npu allocates: ep_recv_counts must hold
    ``(elastic ? W*L : W*L_r) * (2 if tp == 2)`` entries (torch_npu drops the x2 when it sizes
    for expert_scales, which only W >= 8 survives), and V1's ``G // S`` rows on a shared rank
    must hold the A rows it may receive (V1 supports one shared expert, W a multiple of S)."""
    blocks = geom.W * max(geom.L, 1) if elastic else geom.recv_blocks(rank)
    need = blocks * (2 if geom.tp == 2 else 1)
    c.tiling(shapes.ep_recv >= need, "ep_recv_counts.shape[0]", shapes.ep_recv,
             f"must be >= {need}: torch_npu sizes it W*L_r + 2*G*K*(W//8) when expert_scales is given, "
             f"too small with tp_world_size=2 and ep_world_size < 8 (expert_scales is unused on Atlas A3: omit it)")
    c.tiling(shapes.capacity >= geom.capacity(rank), "expand_x.shape[0]", shapes.rows,
             f"must hold the A={geom.capacity(rank)} rows a shared rank may receive: V1 allocates G // S rows, "
             f"enough only with shared_expert_num=1 and ep_world_size a multiple of shared_expert_rank_num")
