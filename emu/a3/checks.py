"""Atlas A3 checks of dispatch and combine, in the operator's order (docs/errors.md).

Layers: the aclnn wrapper (161001 null pointers), the generated layer (161002 dtypes not
among the compiled variants), tiling (561002 attributes, shapes, window), then the
emulator's own data checks where the hardware would hang or corrupt (docs/errors.md, 561002).
Outputs are allocated here as torch_npu allocates them; tiling's rules on their sizes run in
``core.checks.check_allocation``.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from ..core.attrs import Geometry, MoeConfig
from ..core.checks import (XT_DTYPES, Checker, Static, combine_wrapper_checks, dispatch_wrapper_checks,
                           expand_x_dtype_rule, prepare, sized)
from ..core.errors import TILING_ERROR, AclnnError
from ..core.fastpath import static
from ..core.inputs import AddRmsNorm
from ..core.plan import active_set, warn_non_prefix_mask
from ..core.request import CombineRequest, DispatchRequest, Prepared

INT32_MAX = 2**31 - 1
COMM_ALGS = ("", "fullmesh_v1", "fullmesh_v2")


def hccl_buffsize_bytes() -> int:
    """HCCL_BUFFSIZE in bytes as tiling reads it: stoi into a uint16 MiB count, default 200."""
    raw = os.environ.get("HCCL_BUFFSIZE")
    m = re.match(r"\s*([+-]?\d+)", raw) if raw is not None else None
    mib = 200
    if m:
        v = int(m.group(1))
        if -2**31 <= v <= INT32_MAX:
            mib = v % 65536
    return mib * 2**20


def _align(v: int, a: int) -> int:
    return -(-v // a) * a


def window_need(geom: Geometry) -> int:
    """Bytes of window one call needs (docs/errors.md)."""
    comb = _align(2 * geom.H, 512)
    disp = _align(_align(2 * geom.H, 32) + 44, 512)
    return 2 * (geom.max_bs * disp * geom.W * geom.L + geom.max_bs * comb * (geom.K + geom.Ns))


def _common_attrs(c: Checker, cfg: MoeConfig, ep_rank_id: int, tp_rank_id: int,
                  tp_name: str, max_tp: int = 2) -> None:
    ep, tp = cfg.ep_world_size, cfg.tp_world_size
    c.tiling(2 <= ep <= 768, "ep_world_size", ep, "must be in [2, 768]")
    c.tiling(0 <= tp <= max_tp, "tp_world_size", tp, f"must be in [0, {max_tp}]"
             + (" (combine_add_rms_norm has no TP)" if max_tp < 2 else ""))
    c.tiling(0 <= ep_rank_id < ep, "ep_rank_id", ep_rank_id, f"must be in [0, ep_world_size={ep})")
    if tp > 1:
        c.tiling(0 <= tp_rank_id < tp, "tp_rank_id", tp_rank_id, f"must be in [0, tp_world_size={tp})")
        c.tiling(0 < len(tp_name) < 128, "group_tp", tp_name, "must be a non-empty name < 128 chars when tp_world_size > 1")
    else:
        c.tiling(tp_rank_id == 0, "tp_rank_id", tp_rank_id, "must be 0 when tp_world_size <= 1")


def _shared_attrs(c: Checker, cfg: MoeConfig) -> None:
    c.tiling(cfg.expert_shard_type == 0, "expert_shard_type", cfg.expert_shard_type, "must be 0 (shared experts first)")
    c.tiling(0 <= cfg.shared_expert_num <= 4, "shared_expert_num", cfg.shared_expert_num, "must be in [0, 4]")
    c.tiling(0 <= cfg.shared_expert_rank_num < cfg.ep_world_size, "shared_expert_rank_num",
             cfg.shared_expert_rank_num, f"must be in [0, ep_world_size={cfg.ep_world_size})")
    c.tiling(0 < cfg.moe_expert_num <= 1024, "moe_expert_num", cfg.moe_expert_num, "must be in (0, 1024]")


def _special_attrs(c: Checker, cfg: MoeConfig) -> None:
    for name in ("zero_expert_num", "copy_expert_num", "const_expert_num"):
        c.tiling(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be >= 0")
    total = cfg.moe_expert_num + cfg.special_num
    c.tiling(total <= INT32_MAX, "moe_expert_num + zero + copy + const", total, "must be <= INT32_MAX")


def _layout_attrs(c: Checker, cfg: MoeConfig, bs: int, mask, elastic) -> None:
    s, ns, ep, e = cfg.shared_expert_rank_num, cfg.shared_num, cfg.ep_world_size, cfg.moe_expert_num
    c.tiling(not ((ns == 0 and s > 0) or (ns > 0 and s == 0)), "shared_expert_num", ns,
             f"shared_expert_num and shared_expert_rank_num={s} must be both zero or both non-zero")
    if ns:
        c.tiling(s % ns == 0, "shared_expert_rank_num", s, f"must be a multiple of shared_expert_num={ns}")
    c.tiling(e % (ep - s) == 0, "moe_expert_num", e,
             f"must be a multiple of ep_world_size - shared_expert_rank_num = {ep - s}")
    local = e // (ep - s)
    if cfg.tp_world_size > 1:
        c.tiling(local == 1, "moe_expert_num", e, f"tp_world_size=2 needs one MoE expert per rank (got {local})")
        c.tiling(elastic is None, "elastic_info", "given", "not supported with tp_world_size=2")
    c.tiling(1 <= bs <= 512, "x.shape[0] (Bs)", bs, "must be in [1, 512]")
    g = cfg.global_bs
    c.tiling(g == 0 or (g % ep == 0 and g >= bs * ep), "global_bs", g,
             f"must be 0 or a multiple of ep_world_size={ep} that is >= Bs*ep_world_size={bs * ep}")
    if mask is not None:
        c.tiling(not (g > bs * ep), "x_active_mask", "given",
                 f"not allowed when global_bs={g} > Bs*ep_world_size={bs * ep}")


def _k_rule(c: Checker, cfg: MoeConfig, k: int, h: int) -> None:
    c.tiling(1024 <= h <= 8192, "H", h, "hidden size must be in [1024, 8192]")
    c.tiling(1 <= k <= 16, "expert_ids.shape[1] (K)", k, "must be in [1, 16]")
    lim = cfg.moe_expert_num + cfg.special_num
    c.tiling(k <= lim, "expert_ids.shape[1] (K)", k, f"must be <= moe_expert_num + zero + copy + const = {lim}")


def _window(c: Checker, geom: Geometry) -> None:
    need, win = window_need(geom), hccl_buffsize_bytes()
    c.tiling(need <= win, "HCCL_BUFFSIZE", os.environ.get("HCCL_BUFFSIZE", "200 (default)"),
             f"window of {win} bytes is smaller than the {need} bytes this call needs")


def validate_dispatch(req: DispatchRequest) -> Geometry:
    """All checks of dispatch (docs/errors.md) in order; returns the geometry."""
    inp, cfg, place = req.inputs, req.cfg, req.place
    x, expert_ids, scales, mask, elastic = inp.x, inp.expert_ids, inp.scales, inp.x_active_mask, inp.elastic_info
    tp_name = place.tp_name if cfg.tp_world_size > 1 else ""
    c = Checker(req.op)
    dispatch_wrapper_checks(c, req, tp_name)
    c.dtype(elastic, "elastic_info", (torch.int32,))
    _common_attrs(c, cfg, place.ep_rank_id, place.tp_rank_id, tp_name)
    _shared_attrs(c, cfg)
    c.tiling(0 <= cfg.quant_mode <= 2, "quant_mode", cfg.quant_mode, "must be in [0, 2]")
    c.tiling(cfg.expert_token_nums_type in (0, 1), "expert_token_nums_type", cfg.expert_token_nums_type, "must be 0 or 1")
    _special_attrs(c, cfg)
    c.tiling((place.comm_alg or "") in COMM_ALGS, "comm_alg", place.comm_alg, f"must be one of {COMM_ALGS}")
    c.tiling(cfg.quant_mode != 1, "quant_mode", 1, "static quant (1) is not supported")
    c.tiling(not (cfg.quant_mode == 0 and scales is not None), "scales", "given", "must be null when quant_mode=0")
    expand_x_dtype_rule(c, cfg, inp)
    c.dim(x, "x", (2,))
    c.dim(expert_ids, "expert_ids", (2,))
    c.dim(scales, "scales", (2,))
    c.dim(mask, "x_active_mask", (1, 2))
    bs, h = x.shape
    k = expert_ids.shape[1]
    _mask_shape(c, mask, bs, k)
    c.dim(elastic, "elastic_info", (1,))
    _layout_attrs(c, cfg, bs, mask, elastic)
    _k_rule(c, cfg, k, h)
    c.tiling(expert_ids.shape[0] == bs, "expert_ids.shape[0]", expert_ids.shape[0], f"must equal Bs={bs}")
    if scales is not None:
        want = (cfg.shared_num + cfg.moe_expert_num, h)
        c.tiling(tuple(scales.shape) == want, "scales.shape", tuple(scales.shape), f"must be {want}")
    _elastic_length(c, cfg, elastic)
    geom = Geometry.of(cfg, bs, k, h)
    _window(c, geom)
    return geom


def _mask_shape(c: Checker, mask, bs: int, k: int) -> None:
    if mask is not None:
        c.tiling(mask.shape[0] == bs, "x_active_mask.shape[0]", mask.shape[0], f"must equal Bs={bs}")
        if mask.dim() == 2:
            c.tiling(mask.shape[1] == k, "x_active_mask.shape[1]", mask.shape[1], f"must equal K={k}")


def _elastic_length(c: Checker, cfg: MoeConfig, elastic) -> None:
    if elastic is not None:
        want = 4 + 2 * cfg.ep_world_size
        c.tiling(elastic.shape[0] == want, "elastic_info.shape[0]", elastic.shape[0],
                 f"must be 4 + 2*ep_world_size = {want}")


def validate_combine(req: CombineRequest) -> Geometry:
    """All checks of combine (docs/errors.md) in order; returns the geometry.  V1
    (``inputs.positional``): ``assist_info`` is expand_idx (Bs*K entries)."""
    inp, cfg, place = req.inputs, req.cfg, req.place
    expand_x, expert_ids, assist_info, mask = inp.expand_x, inp.expert_ids, inp.assist_info, inp.x_active_mask
    ep_send_counts, expert_scales, elastic, sp = inp.ep_send_counts, inp.expert_scales, inp.elastic_info, inp.special
    v1 = inp.positional
    tp_name = place.tp_name if cfg.tp_world_size > 1 else ""
    c = Checker(req.op)
    combine_wrapper_checks(c, req, tp_name, "expand_idx" if v1 else "assist_info_for_combine")
    if inp.norm is not None:                       # its only compiled variant is bf16
        for tensor, name in ((expand_x, "expand_x"), (inp.norm.residual_x, "residual_x"), (inp.norm.gamma, "gamma")):
            c.dtype(tensor, name, (torch.bfloat16,))
    optional = ((inp.shared_expert_x, "shared_expert_x"),) + sp.tensors()
    for t, name in optional:
        c.dtype(t, name, XT_DTYPES)
    # never read with tp 0/1, where clients pass torch.empty(1) (fp32) or None: any dtype then,
    # but with tp 1 tiling still wants one entry (tpSendCounts.dim0 == tp); tp 0 is not checked
    tp_send_counts = inp.tp_send_counts if cfg.tp_world_size > 1 else None
    tp_shaped = inp.tp_send_counts if cfg.tp_world_size >= 1 else None
    for t, name in ((expert_ids, "expert_ids"), (assist_info, "assist_info_for_combine"),
                    (ep_send_counts, "ep_send_counts"), (tp_send_counts, "tp_send_counts"),
                    (elastic, "elastic_info")):
        c.dtype(t, name, (torch.int32,))
    c.dtype(expert_scales, "expert_scales", (torch.float32,))
    c.dtype(mask, "x_active_mask", (torch.bool,))
    _special_attrs(c, cfg)
    _common_attrs(c, cfg, place.ep_rank_id, place.tp_rank_id, tp_name, 1 if inp.norm is not None else 2)
    if cfg.tp_world_size > 1:
        c.tiling(cfg.comm_quant_mode == 0, "comm_quant_mode", cfg.comm_quant_mode, "must be 0 when tp_world_size=2")
    _shared_attrs(c, cfg)
    c.tiling(cfg.comm_quant_mode in (0, 2), "comm_quant_mode", cfg.comm_quant_mode, "must be 0 or 2")
    c.tiling((place.comm_alg or "") in COMM_ALGS, "comm_alg", place.comm_alg, f"must be one of {COMM_ALGS}")
    c.dim(expand_x, "expand_x", (2,))
    c.dim(expert_ids, "expert_ids", (2,))
    c.dim(assist_info, "assist_info_for_combine", (1,))
    c.dim(ep_send_counts, "ep_send_counts", (1,))
    c.dim(expert_scales, "expert_scales", (2,))
    c.dim(sp.ori_x, "ori_x", (2,))
    c.dim(sp.alpha1, "const_expert_alpha_1", (1,))
    c.dim(sp.alpha2, "const_expert_alpha_2", (1,))
    c.dim(sp.v, "const_expert_v", (2,))
    if cfg.tp_world_size == 2:
        c.tiling(tp_send_counts is not None, "tp_send_counts", None, "required when tp_world_size=2")
    c.dim(tp_shaped, "tp_send_counts", (1,))
    c.dim(mask, "x_active_mask", (1, 2))
    c.dim(elastic, "elastic_info", (1,))
    if inp.shared_expert_x is not None:
        c.tiling(cfg.shared_expert_rank_num == 0, "shared_expert_x", "given",
                 "only allowed when shared_expert_rank_num == 0")
        c.dim(inp.shared_expert_x, "shared_expert_x", (2, 3))
    for t, name in optional:
        if t is not None:
            c.tiling(t.dtype == expand_x.dtype, f"{name}.dtype", t.dtype, f"must equal expand_x.dtype={expand_x.dtype}")
    bs, k = expert_ids.shape
    _layout_attrs(c, cfg, bs, mask, elastic)
    if cfg.copy_expert_num > 0:
        c.tiling(sp.ori_x is not None, "ori_x", None, "required when copy_expert_num > 0")
    if cfg.const_expert_num > 0:
        for t, name in sp.tensors():
            c.tiling(t is not None, name, None, "required when const_expert_num > 0")
    h = expand_x.shape[1]
    _k_rule(c, cfg, k, h)
    geom = Geometry.of(cfg, bs, k, h)
    _elastic_length(c, cfg, elastic)
    _combine_shapes(c, req, geom, tp_shaped)
    if inp.norm is not None:
        _add_rms_norm_inputs(c, inp.norm, bs, h)
    _window(c, geom)
    return geom


def _combine_shapes(c: Checker, req: CombineRequest, geom: Geometry, tp_send_counts) -> None:
    """Combine's tensor lengths and shapes (docs/errors.md), in order."""
    inp, cfg, rank = req.inputs, req.cfg, req.place.ep_rank_id
    bs, k, h = inp.expert_ids.shape[0], geom.K, geom.H
    tp = cfg.tp_world_size
    a = geom.capacity(rank)
    c.tiling(inp.expand_x.shape[0] >= a * tp, "expand_x.shape[0]", inp.expand_x.shape[0],
             f"must be >= A*tp_world_size = {a * tp}")
    if inp.positional:
        c.tiling(inp.assist_info.shape[0] >= bs * k, "expand_idx.shape[0]", inp.assist_info.shape[0],
                 f"must be >= Bs*K = {bs * k}")
    else:
        c.tiling(inp.assist_info.shape[0] >= 128 * a, "assist_info_for_combine.shape[0]", inp.assist_info.shape[0],
                 f"must be >= 128*A = {128 * a}")
    n = inp.ep_send_counts.shape[0]
    # with elastic_info any rank may have either role: tiling wants max(W, W*L) entries (per TP rank)
    blocks = max(geom.W, geom.W * geom.L) if inp.elastic_info is not None else geom.recv_blocks(rank)
    if tp:
        c.tiling(n >= blocks * tp, "ep_send_counts.shape[0]", n, f"must be >= {blocks * tp}"
                 + (" = max(W, W*L) * tp_world_size (elastic_info given)" if inp.elastic_info is not None else ""))
    else:
        c.tiling(n >= blocks, "ep_send_counts.shape[0]", n, f"must be >= {blocks} (the own total is read there)")
    if tp_send_counts is not None:
        c.tiling(tp_send_counts.shape[0] == tp, "tp_send_counts.shape[0]", tp_send_counts.shape[0],
                 f"must equal tp_world_size={tp}")
    c.tiling(tuple(inp.expert_scales.shape) == (bs, k), "expert_scales.shape", tuple(inp.expert_scales.shape),
             f"must be {(bs, k)}")
    _mask_shape(c, inp.x_active_mask, bs, k)
    if inp.shared_expert_x is not None:
        s = tuple(inp.shared_expert_x.shape)
        ok = (s == (bs, h)) if len(s) == 2 else (s[0] * s[1] == bs and s[2] == h)
        c.tiling(ok, "shared_expert_x.shape", s, f"must be (Bs, H) = {(bs, h)} or (a, b, H) with a*b = Bs")
    sp = inp.special
    if sp.ori_x is not None:
        c.tiling(tuple(sp.ori_x.shape) == (bs, h), "ori_x.shape", tuple(sp.ori_x.shape), f"must be {(bs, h)}")
    for t, name in ((sp.alpha1, "const_expert_alpha_1"), (sp.alpha2, "const_expert_alpha_2")):
        if t is not None:
            c.tiling(t.shape[0] == sp.const, f"{name}.shape[0]", t.shape[0], f"must equal const_expert_num={sp.const}")
    if sp.v is not None:
        c.tiling(tuple(sp.v.shape) == (sp.const, h), "const_expert_v.shape", tuple(sp.v.shape),
                 f"must be {(sp.const, h)}")


def _add_rms_norm_inputs(c: Checker, norm: AddRmsNorm, bs: int, h: int) -> None:
    """combine_add_rms_norm's own tiling rules (after combine's): reserved inputs absent,
    residual_x (Bs, 1, H), gamma (H,)."""
    for name in norm.reserved:
        c.tiling(False, name, "given", "is reserved: must be None")
    for tensor, name, dims in ((norm.residual_x, "residual_x", 3), (norm.gamma, "gamma", 1)):
        c.tiling(tensor is not None, name, None, "required")
        c.dim(tensor, name, (dims,))
    c.tiling(tuple(norm.residual_x.shape) == (bs, 1, h), "residual_x.shape", tuple(norm.residual_x.shape),
             f"must be (Bs, 1, H) = {(bs, 1, h)}")
    c.tiling(norm.gamma.shape[0] == h, "gamma.shape[0]", norm.gamma.shape[0], f"must equal H={h}")


def static_dispatch(req: DispatchRequest) -> Static:
    """Every static check of A3 dispatch (docs/errors.md), in order."""
    return sized(req, validate_dispatch(req))


def static_combine(req: CombineRequest) -> Static:
    """Every static check of A3 combine (docs/errors.md), in order."""
    return sized(req, validate_combine(req))


def check_dispatch(req: DispatchRequest) -> Prepared:
    """Every check of A3 dispatch (the static ones once per signature), then the data checks:
    the validated call."""
    st = static(static_dispatch, req)
    warn_non_prefix_mask(req.inputs.x_active_mask)
    act = active_set(*req.inputs.expert_ids.shape, req.inputs.x_active_mask)
    return prepare(req, st, req.inputs.x.dtype, act)


def check_combine(req: CombineRequest) -> Prepared:
    """Every check of A3 combine (the static ones once per signature), then the data checks on
    the rows this rank returns."""
    st = static(static_combine, req)
    act = active_set(*req.inputs.expert_ids.shape, req.inputs.x_active_mask)
    prep = prepare(req, st, req.inputs.expand_x.dtype, act)
    check_own_rows(prep, req.inputs)
    return prep


def own_rows(geom: Geometry, rank: int, ep_send_counts: torch.Tensor) -> int:
    """Rows this rank received in dispatch: ``ep_send_counts[W*L_r - 1]`` (docs/combine.md)."""
    return int(ep_send_counts[geom.recv_blocks(rank) - 1])


def check_own_rows(prep: Prepared, inp) -> None:
    """Data checks on what this rank is asked to return (561002 instead of garbage)."""
    geom, rank, cap = prep.route, prep.me, prep.shapes.capacity
    if geom.recv_blocks(rank) > inp.ep_send_counts.shape[0]:
        raise AclnnError(TILING_ERROR, f"combine: ep_send_counts has {inp.ep_send_counts.shape[0]} entries, EP rank "
                         f"{rank} reads its total at [{geom.recv_blocks(rank) - 1}]")
    own = own_rows(geom, rank, inp.ep_send_counts)
    if not 0 <= own <= cap:
        raise AclnnError(TILING_ERROR, f"combine: ep_send_counts[{geom.recv_blocks(rank) - 1}]={own} on EP rank "
                         f"{rank} must be in [0, A={cap}]")
    if inp.positional:
        return
    tri = inp.assist_info[:3 * own].detach().numpy().reshape(own, 3)
    if not own or (tri.min(axis=0) >= 0).all() and tri[:, 0].max() < geom.W and tri[:, 2].max() < geom.K + geom.Ns:
        return
    bad = (tri[:, 0] < 0) | (tri[:, 0] >= geom.W) | (tri[:, 1] < 0) | (tri[:, 2] < 0) | (tri[:, 2] >= geom.K + geom.Ns)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AclnnError(TILING_ERROR, f"combine: assist_info_for_combine[{3 * i}:{3 * i + 3}]="
                         f"{tri[i].tolist()} on EP rank {rank} is not a dispatch triple")
