"""Atlas A2 parameter checks, in the operator's order (docs/atlas-a2.md).

Layer 1 (161001) and layer 2 (161002) are those of A3; tiling (561002) then checks commAlg,
shapes and attributes.  A2 tiling does not look at sharedExpertNum / sharedExpertRankNum /
tp values (forced to 0), globalBs or output sizes; as docs/atlas-a2.md chooses, mc2-emu also rejects
the limits the doc states but tiling does not check (ep in [16, 256] multiple of 8, hierarchy
ep <= 64 with 2/4/8 servers, fullmesh L <= 24).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..core.attrs import Geometry, MoeConfig
from ..core.checks import (Checker, Static, combine_wrapper_checks, dispatch_wrapper_checks, expand_x_dtype_rule,
                           prepare, sized)
from ..core.errors import PARAM_INVALID
from ..core.fastpath import static
from ..core.plan import active_set
from ..core.request import CombineRequest, DispatchRequest, Prepared, R
from ..core.soc import a2_comm_alg


def _attrs(c: Checker, cfg: MoeConfig, ep_rank_id: int, ep_name: str) -> None:
    W, E = cfg.ep_world_size, cfg.moe_expert_num
    c.tiling(0 < len(ep_name) < 128, "group_ep", ep_name, "must be a non-empty name < 128 chars")
    c.tiling(0 < W <= 256 and W % 8 == 0, "ep_world_size", W, "must be a multiple of 8 in (0, 256]")
    c.tiling(0 <= ep_rank_id < W, "ep_rank_id", ep_rank_id, f"must be in [0, ep_world_size={W})")
    c.tiling(0 < E <= 512 and E % W == 0, "moe_expert_num", E, f"must be in (0, 512] and a multiple of ep_world_size={W}")


def _h_limit(c: Checker, h: int, alg: str) -> None:
    hmax = 10240 if alg == "hierarchy" else 7168
    c.tiling(h % 32 == 0 and 0 < h <= hmax, "H", h, f"must be a non-zero multiple of 32 <= {hmax} ({alg})")


def _bs_k_limits(c: Checker, bs: int, k: int) -> None:
    c.tiling(0 < bs <= 256, "expert_ids.shape[0] (Bs)", bs, "must be in [1, 256] on Atlas A2")
    c.tiling(0 < k <= 16, "expert_ids.shape[1] (K)", k, "must be in [1, 16]")


def _mask_rule(c: Checker, mask, bs: int) -> None:
    if mask is not None:
        c.tiling(mask.dim() == 1, "x_active_mask.dim()", mask.dim(), "must be 1-D on Atlas A2")
        c.tiling(mask.shape[0] == bs, "x_active_mask.shape[0]", mask.shape[0], f"must equal Bs={bs}")


def _doc_limits(c: Checker, cfg: MoeConfig, alg: str) -> None:
    """Limits of the doc that A2 tiling does not check (docs/atlas-a2.md: rejected here)."""
    W = cfg.ep_world_size
    c.tiling(W >= 16, "ep_world_size", W, "the doc supports ep_world_size in {16, ..., 256} on Atlas A2 "
             "(8 passes the hardware's tiling; mc2-emu is stricter)")
    if alg == "hierarchy":
        c.tiling(W <= 64 and W // 8 in (2, 4, 8), "ep_world_size", W,
                 "hierarchy supports 2, 4 or 8 servers of 8 ranks (ep_world_size <= 64)")
    else:
        L = cfg.moe_expert_num // W
        c.tiling(L <= 24, "moe_expert_num", cfg.moe_expert_num,
                 f"fullmesh supports at most 24 experts per rank (got {L}; more corrupts the ready flag)")


def validate_dispatch_a2(req: DispatchRequest) -> tuple[Geometry, str]:
    """All A2 dispatch checks in order; returns (geometry, "fullmesh" | "hierarchy")."""
    inp, cfg, place = req.inputs, req.cfg, req.place
    x, expert_ids, scales, mask = inp.x, inp.expert_ids, inp.scales, inp.x_active_mask
    c = Checker(req.op)
    dispatch_wrapper_checks(c, req, place.tp_name)
    c.dtype(inp.expert_scales, "expert_scales", (torch.float32,))
    alg = a2_comm_alg(place.comm_alg, req.op)
    if alg == "hierarchy":
        c.tiling(inp.expert_scales is not None, "expert_scales", None, "required with comm_alg hierarchy")
    c.tiling(inp.elastic_info is None, "elastic_info", "given", "not supported on Atlas A2")
    c.dim(x, "x", (2,))
    c.dim(expert_ids, "expert_ids", (2,))
    h = x.shape[1]
    _h_limit(c, h, alg)
    bs, k = expert_ids.shape
    _bs_k_limits(c, bs, k)
    c.tiling(not (cfg.quant_mode == 0 and scales is not None), "scales", "given", "must be null when quant_mode=0")
    expand_x_dtype_rule(c, cfg, inp)
    _mask_rule(c, mask, bs)
    _attrs(c, cfg, place.ep_rank_id, place.ep_name)
    c.tiling(cfg.quant_mode in (0, 2), "quant_mode", cfg.quant_mode, "must be 0 or 2 on Atlas A2")
    c.tiling(cfg.expert_token_nums_type in (0, 1), "expert_token_nums_type", cfg.expert_token_nums_type,
             "must be 0 or 1")
    _no_special(c, cfg)
    _doc_limits(c, cfg, alg)
    if scales is not None:
        want = (cfg.moe_expert_num, h)
        c.tiling(tuple(scales.shape) == want, "scales.shape", tuple(scales.shape),
                 f"must be {want} (smooth row = expert id on Atlas A2)")
    return Geometry.of(cfg, bs, k, h), alg


def _no_special(c: Checker, cfg: MoeConfig) -> None:
    for name in ("zero_expert_num", "copy_expert_num", "const_expert_num"):
        c.tiling(getattr(cfg, name) == 0, name, getattr(cfg, name), "special experts are not supported on Atlas A2")


def validate_combine_a2(req: CombineRequest) -> tuple[Geometry, str]:
    """All A2 combine checks in order; returns (geometry, "fullmesh" | "hierarchy")."""
    inp, cfg, place = req.inputs, req.cfg, req.place
    c = Checker(req.op)
    combine_wrapper_checks(c, req, place.tp_name, "expand_idx" if inp.positional else "assist_info_for_combine")
    c.need(inp.norm is None, PARAM_INVALID, "soc", "Atlas A2", "combine_add_rms_norm runs on Atlas A3 only")
    c.dtype(inp.expert_ids, "expert_ids", (torch.int32,))
    c.dtype(inp.ep_send_counts, "ep_send_counts", (torch.int32,))
    c.dtype(inp.expert_scales, "expert_scales", (torch.float32,))
    c.dtype(inp.x_active_mask, "x_active_mask", (torch.bool,))
    alg = a2_comm_alg(place.comm_alg, req.op)
    c.tiling(inp.elastic_info is None, "elastic_info", "given", "not supported on Atlas A2")
    for t, name in inp.special.tensors():
        c.tiling(t is None, name, "given", "special experts are not supported on Atlas A2")
    c.dim(inp.expand_x, "expand_x", (2,))
    h = inp.expand_x.shape[1]
    _h_limit(c, h, alg)
    c.dim(inp.expert_ids, "expert_ids", (2,))
    bs, k = inp.expert_ids.shape
    _bs_k_limits(c, bs, k)
    _mask_rule(c, inp.x_active_mask, bs)
    _no_special(c, cfg)
    _attrs(c, cfg, place.ep_rank_id, place.ep_name)
    if alg == "fullmesh":
        c.tiling(cfg.comm_quant_mode == 0, "comm_quant_mode", cfg.comm_quant_mode, "must be 0 with fullmesh")
    else:
        c.tiling(cfg.comm_quant_mode in (0, 2), "comm_quant_mode", cfg.comm_quant_mode, "must be 0 or 2 with hierarchy")
    _doc_limits(c, cfg, alg)
    geom = Geometry.of(cfg, bs, k, h)
    counts = inp.ep_send_counts
    c.tiling(counts.shape[0] >= geom.W * geom.L, "ep_send_counts.shape[0]", counts.shape[0],
             f"must be >= ep_world_size * L = {geom.W * geom.L} (its first E entries are read)")
    c.tiling(inp.expand_x.shape[0] >= int(counts[geom.W * geom.L - 1]), "expand_x.shape[0]", inp.expand_x.shape[0],
             "must hold every row this rank received (mc2-emu: the hardware reads past the end)")
    return geom, alg


def on_a2(req: R) -> R:
    """The request as A2 sees it: tp, shared experts and the shard type forced to 0
    (docs/atlas-a2.md), the operator named as on Atlas A2 in messages."""
    cfg = replace(req.cfg, tp_world_size=0, shared_expert_num=0, shared_expert_rank_num=0, expert_shard_type=0)
    return replace(req, op=f"{req.op} (A2)", cfg=cfg)


def static_dispatch(req: DispatchRequest) -> Static:
    """Every static check of A2 dispatch, in order."""
    geom, alg = validate_dispatch_a2(req)
    return sized(req, geom, alg)


def static_combine(req: CombineRequest) -> Static:
    """Every static check of A2 combine; hierarchy needs expand_scales and (not emulated) comm
    quant 0."""
    geom, alg = validate_combine_a2(req)
    if alg == "hierarchy":
        c = Checker(req.op)
        c.tiling(req.inputs.expand_scales is not None, "expand_scales", None,
                 "required with hierarchy (the hardware reads it; null faults the device)")
        c.tiling(req.cfg.comm_quant_mode == 0, "comm_quant_mode", req.cfg.comm_quant_mode,
                 "mc2-emu does not emulate hierarchy int8 partials yet (their layout is not known)")
    return sized(req, geom, alg)


def check_dispatch(req: DispatchRequest) -> Prepared:
    """Every A2 dispatch check (the static ones once per signature), then the id checks over the
    slots the path reads (hierarchy ignores the mask)."""
    st = static(static_dispatch, req)
    act = active_set(*req.inputs.expert_ids.shape, req.inputs.x_active_mask if st.algorithm == "fullmesh" else None)
    return prepare(req, st, req.inputs.x.dtype, act)


def check_combine(req: CombineRequest) -> Prepared:
    """Every A2 combine check (the static ones once per signature), then the data checks."""
    st = static(static_combine, req)
    act = active_set(*req.inputs.expert_ids.shape, req.inputs.x_active_mask if st.algorithm == "fullmesh" else None)
    return prepare(req, st, req.inputs.expand_x.dtype, act)
