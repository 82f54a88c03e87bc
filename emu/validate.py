"""Parameter validation of dispatch and combine, in the operator's order (spec §10, §15).

Layers: the aclnn wrapper (161001 null pointers), the generated layer (161002 dtypes not
among the compiled variants), tiling (561002 attributes, shapes, window), then the
emulator's own data checks where the hardware would hang or corrupt (spec §15, 561002).
Output-buffer checks of tiling are omitted: outputs are allocated here at the eager
shapes, which always pass them.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from .attrs import Geometry, MoeConfig
from .errors import PARAM_INVALID, PARAM_NULLPTR, TILING_ERROR, AclnnError

INT32_MAX = 2**31 - 1
XT_DTYPES = (torch.bfloat16, torch.float16)
COMM_ALGS = ("", "fullmesh_v1", "fullmesh_v2")


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
        if tensor is not None:
            self.need(tensor.dtype in allowed, code, f"{param}.dtype", tensor.dtype,
                      f"dtype must be one of {[str(d) for d in allowed]}")

    def dim(self, tensor, param: str, dims: tuple[int, ...]) -> None:
        if tensor is not None:
            self.need(tensor.dim() in dims, TILING_ERROR, f"{param}.dim()", tensor.dim(),
                      f"must be {' or '.join(map(str, dims))}-D")

    def tiling(self, ok: bool, param: str, value, rule: str) -> None:
        self.need(ok, TILING_ERROR, param, value, rule)


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
    """Bytes of window one call needs (spec §10.4)."""
    comb = _align(2 * geom.H, 512)
    disp = _align(_align(2 * geom.H, 32) + 44, 512)
    return 2 * (geom.max_bs * disp * geom.W * geom.L + geom.max_bs * comb * (geom.K + geom.Ns))


def _common_attrs(c: Checker, cfg: MoeConfig, ep_rank_id: int, tp_rank_id: int,
                  tp_name: str) -> None:
    ep, tp = cfg.ep_world_size, cfg.tp_world_size
    c.tiling(2 <= ep <= 768, "ep_world_size", ep, "must be in [2, 768]")
    c.tiling(0 <= tp <= 2, "tp_world_size", tp, "must be in [0, 2]")
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


def check_ids(c: Checker, rank: int, expert_ids: torch.Tensor, slots: np.ndarray, moe_now: int,
              moe_orig: int, special: int) -> None:
    """Emulator data checks (spec §15): id ranges and duplicate MoE ids in a token's row.

    Valid ids: MoE ``[0, moe_now)`` (E' under elastic scaling) and, with special experts,
    ``[moe_orig, moe_orig + special)`` (the ORIGINAL E, spec §7).  ``slots``: (Bs, K) bool, the
    active slots; inactive slots are never read by the kernel.
    """
    ids = expert_ids.detach().cpu().numpy().astype(np.int64)
    ok = (ids >= 0) & (ids < moe_now)
    if special:
        ok |= (ids >= moe_orig) & (ids < moe_orig + special)
    bad = slots & ~ok
    if bad.any():
        t, k = map(int, np.argwhere(bad)[0])
        v = int(ids[t, k])
        if moe_now < moe_orig and moe_now <= v < moe_orig:
            rule = (f"ids in [E'={moe_now}, E={moe_orig}) are dropped by dispatch but awaited by combine "
                    f"under elastic scaling (spec §7)")
        elif special:
            rule = (f"ids must be in [0, {moe_now}) or in the special range [{moe_orig}, {moe_orig + special})")
        else:
            rule = f"ids must be in [0, {moe_now})"
        c.tiling(False, f"expert_ids[{t}, {k}] on EP rank {rank}", v, rule)
    moe = np.where(slots & (ids >= 0) & (ids < moe_now), ids, -1 - np.arange(ids.shape[1])[None, :])
    srt = np.sort(moe, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        t = int(np.argwhere(dup)[0][0])
        c.tiling(False, f"expert_ids[{t}] on EP rank {rank}", ids[t].tolist(),
                 "a token may not choose the same MoE expert twice")


def check_remap(c: Checker, remap, cfg: MoeConfig, ep_rank_id: int) -> None:
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
    old = remap.survivors()
    ok = bool(((old >= 0) & (old < W)).all()) and len(set(old.tolist())) == w2 \
        and bool((remap.to_new[old] == np.arange(w2)).all()) and int((remap.to_new >= 0).sum()) == w2
    c.tiling(ok, "elastic_info tables", remap.to_new.tolist() + remap.to_old.tolist(),
             "table 1 (rank -> new id) and table 2 (new id -> rank) must be inverse permutations of the W' survivors")


def dispatch_wrapper_checks(c: Checker, x, expert_ids, ep_name: str, tp_name: str, scales, mask) -> None:
    """Layers 1 and 2 of dispatch, the same on A3 and A2: null tensors and group names (161001),
    then dtypes outside the compiled variants (161002)."""
    c.not_null(x, "x")
    c.not_null(expert_ids, "expert_ids")
    c.need(bool(ep_name), PARAM_NULLPTR, "group_ep", ep_name, "must be a non-empty group name")
    c.need(len(ep_name) < 128, PARAM_NULLPTR, "group_ep", ep_name, "name must be shorter than 128 chars")
    c.need(len(tp_name) < 128, PARAM_NULLPTR, "group_tp", tp_name, "name must be shorter than 128 chars")
    c.dtype(x, "x", XT_DTYPES)
    c.dtype(expert_ids, "expert_ids", (torch.int32,))
    c.dtype(scales, "scales", (torch.float32,))
    c.dtype(mask, "x_active_mask", (torch.bool,))


def validate_dispatch(*, x, expert_ids, ep_name: str, tp_name: str, cfg: MoeConfig, ep_rank_id: int,
                      tp_rank_id: int, scales, mask, elastic, comm_alg) -> Geometry:
    """All checks of dispatch (spec §10.1-§10.2, §10.4) in order; returns the geometry."""
    c = Checker("aclnnMoeDistributeDispatchV3")
    dispatch_wrapper_checks(c, x, expert_ids, ep_name, tp_name, scales, mask)
    c.dtype(elastic, "elastic_info", (torch.int32,))
    _common_attrs(c, cfg, ep_rank_id, tp_rank_id, tp_name)
    _shared_attrs(c, cfg)
    c.tiling(0 <= cfg.quant_mode <= 2, "quant_mode", cfg.quant_mode, "must be in [0, 2]")
    c.tiling(cfg.expert_token_nums_type in (0, 1), "expert_token_nums_type", cfg.expert_token_nums_type, "must be 0 or 1")
    _special_attrs(c, cfg)
    c.tiling((comm_alg or "") in COMM_ALGS, "comm_alg", comm_alg, f"must be one of {COMM_ALGS}")
    c.tiling(cfg.quant_mode != 1, "quant_mode", 1, "static quant (1) is not supported")
    c.tiling(not (cfg.quant_mode == 0 and scales is not None), "scales", "given", "must be null when quant_mode=0")
    c.dim(x, "x", (2,))
    c.dim(expert_ids, "expert_ids", (2,))
    c.dim(scales, "scales", (2,))
    c.dim(mask, "x_active_mask", (1, 2))
    bs, h = x.shape
    k = expert_ids.shape[1]
    if mask is not None:
        c.tiling(mask.shape[0] == bs, "x_active_mask.shape[0]", mask.shape[0], f"must equal Bs={bs}")
        if mask.dim() == 2:
            c.tiling(mask.shape[1] == k, "x_active_mask.shape[1]", mask.shape[1], f"must equal K={k}")
    c.dim(elastic, "elastic_info", (1,))
    _layout_attrs(c, cfg, bs, mask, elastic)
    _k_rule(c, cfg, k, h)
    c.tiling(expert_ids.shape[0] == bs, "expert_ids.shape[0]", expert_ids.shape[0], f"must equal Bs={bs}")
    if scales is not None:
        want = (cfg.shared_num + cfg.moe_expert_num, h)
        c.tiling(tuple(scales.shape) == want, "scales.shape", tuple(scales.shape), f"must be {want}")
    if elastic is not None:
        want = 4 + 2 * cfg.ep_world_size
        c.tiling(elastic.shape[0] == want, "elastic_info.shape[0]", elastic.shape[0], f"must be 4 + 2*ep_world_size = {want}")
    geom = Geometry.of(cfg, bs, k, h)
    _window(c, geom)
    return geom


def combine_wrapper_checks(c: Checker, expand_x, expert_ids, assist_info, ep_send_counts, expert_scales,
                           ep_name: str, tp_name: str, assist_name: str = "assist_info_for_combine") -> None:
    """Layer 1 of combine and its first dtype rule, the same on A3 and A2: null tensors and
    group names (161001; a group name >= 128 chars is 161002 in combine), expand_x bf16/fp16."""
    for t, name in ((expand_x, "expand_x"), (expert_ids, "expert_ids"), (assist_info, assist_name),
                    (ep_send_counts, "ep_send_counts"), (expert_scales, "expert_scales")):
        c.not_null(t, name)
    c.need(bool(ep_name), PARAM_NULLPTR, "group_ep", ep_name, "must be a non-empty group name")
    c.need(len(ep_name) < 128, PARAM_INVALID, "group_ep", ep_name, "name must be shorter than 128 chars")
    c.need(len(tp_name) < 128, PARAM_INVALID, "group_tp", tp_name, "name must be shorter than 128 chars")
    c.dtype(expand_x, "expand_x", XT_DTYPES)


def validate_combine(*, expand_x, expert_ids, assist_info, ep_send_counts, expert_scales,
                     ep_name: str, tp_name: str, cfg: MoeConfig, ep_rank_id: int, tp_rank_id: int,
                     tp_send_counts, mask, shared_expert_x, elastic, ori_x, alpha1, alpha2,
                     const_v, comm_alg, v1: bool = False) -> Geometry:
    """All checks of combine (spec §10.1, §10.3) in order; returns the geometry.
    ``v1``: the V1 op, whose ``assist_info`` is expand_idx (Bs*K entries)."""
    c = Checker("aclnnMoeDistributeCombine" if v1 else "aclnnMoeDistributeCombineV3")
    combine_wrapper_checks(c, expand_x, expert_ids, assist_info, ep_send_counts, expert_scales, ep_name, tp_name,
                           "expand_idx" if v1 else "assist_info_for_combine")
    for t, name in ((shared_expert_x, "shared_expert_x"), (ori_x, "ori_x"), (alpha1, "const_expert_alpha_1"),
                    (alpha2, "const_expert_alpha_2"), (const_v, "const_expert_v")):
        c.dtype(t, name, XT_DTYPES)
    if cfg.tp_world_size <= 1:
        tp_send_counts = None     # never read with tp 0/1; clients pass torch.empty(1) (fp32) or None
    for t, name in ((expert_ids, "expert_ids"), (assist_info, "assist_info_for_combine"),
                    (ep_send_counts, "ep_send_counts"), (tp_send_counts, "tp_send_counts"),
                    (elastic, "elastic_info")):
        c.dtype(t, name, (torch.int32,))
    c.dtype(expert_scales, "expert_scales", (torch.float32,))
    c.dtype(mask, "x_active_mask", (torch.bool,))
    _special_attrs(c, cfg)
    _common_attrs(c, cfg, ep_rank_id, tp_rank_id, tp_name)
    if cfg.tp_world_size > 1:
        c.tiling(cfg.comm_quant_mode == 0, "comm_quant_mode", cfg.comm_quant_mode, "must be 0 when tp_world_size=2")
    _shared_attrs(c, cfg)
    c.tiling(cfg.comm_quant_mode in (0, 2), "comm_quant_mode", cfg.comm_quant_mode, "must be 0 or 2")
    c.tiling((comm_alg or "") in COMM_ALGS, "comm_alg", comm_alg, f"must be one of {COMM_ALGS}")
    c.dim(expand_x, "expand_x", (2,))
    c.dim(expert_ids, "expert_ids", (2,))
    c.dim(assist_info, "assist_info_for_combine", (1,))
    c.dim(ep_send_counts, "ep_send_counts", (1,))
    c.dim(expert_scales, "expert_scales", (2,))
    c.dim(ori_x, "ori_x", (2,))
    c.dim(alpha1, "const_expert_alpha_1", (1,))
    c.dim(alpha2, "const_expert_alpha_2", (1,))
    c.dim(const_v, "const_expert_v", (2,))
    if cfg.tp_world_size == 2:
        c.tiling(tp_send_counts is not None, "tp_send_counts", None, "required when tp_world_size=2")
    c.dim(tp_send_counts, "tp_send_counts", (1,))
    c.dim(mask, "x_active_mask", (1, 2))
    c.dim(elastic, "elastic_info", (1,))
    if shared_expert_x is not None:
        c.tiling(cfg.shared_expert_rank_num == 0, "shared_expert_x", "given",
                 "only allowed when shared_expert_rank_num == 0")
        c.dim(shared_expert_x, "shared_expert_x", (2, 3))
    for t, name in ((shared_expert_x, "shared_expert_x"), (ori_x, "ori_x"), (alpha1, "const_expert_alpha_1"),
                    (alpha2, "const_expert_alpha_2"), (const_v, "const_expert_v")):
        if t is not None:
            c.tiling(t.dtype == expand_x.dtype, f"{name}.dtype", t.dtype, f"must equal expand_x.dtype={expand_x.dtype}")
    bs, k = expert_ids.shape
    _layout_attrs(c, cfg, bs, mask, elastic)
    if cfg.copy_expert_num > 0:
        c.tiling(ori_x is not None, "ori_x", None, "required when copy_expert_num > 0")
    if cfg.const_expert_num > 0:
        for t, name in ((ori_x, "ori_x"), (alpha1, "const_expert_alpha_1"), (alpha2, "const_expert_alpha_2"),
                        (const_v, "const_expert_v")):
            c.tiling(t is not None, name, None, "required when const_expert_num > 0")
    h = expand_x.shape[1]
    _k_rule(c, cfg, k, h)
    geom = Geometry.of(cfg, bs, k, h)
    if elastic is not None:
        want = 4 + 2 * cfg.ep_world_size
        c.tiling(elastic.shape[0] == want, "elastic_info.shape[0]", elastic.shape[0], f"must be 4 + 2*ep_world_size = {want}")
    tp = cfg.tp_world_size
    a = geom.capacity(ep_rank_id)
    c.tiling(expand_x.shape[0] >= a * tp, "expand_x.shape[0]", expand_x.shape[0], f"must be >= A*tp_world_size = {a * tp}")
    if v1:
        c.tiling(assist_info.shape[0] >= bs * k, "expand_idx.shape[0]", assist_info.shape[0], f"must be >= Bs*K = {bs * k}")
    else:
        c.tiling(assist_info.shape[0] >= 128 * a, "assist_info_for_combine.shape[0]", assist_info.shape[0],
                 f"must be >= 128*A = {128 * a}")
    if tp:
        want = geom.recv_blocks(ep_rank_id) * tp
        c.tiling(ep_send_counts.shape[0] >= want, "ep_send_counts.shape[0]", ep_send_counts.shape[0], f"must be >= {want}")
    else:
        c.tiling(ep_send_counts.shape[0] >= geom.recv_blocks(ep_rank_id), "ep_send_counts.shape[0]",
                 ep_send_counts.shape[0], f"must be >= {geom.recv_blocks(ep_rank_id)} (the own total is read there)")
    if tp_send_counts is not None and tp in (0, 2):
        c.tiling(tp_send_counts.shape[0] == tp, "tp_send_counts.shape[0]", tp_send_counts.shape[0], f"must equal tp_world_size={tp}")
    c.tiling(tuple(expert_scales.shape) == (bs, k), "expert_scales.shape", tuple(expert_scales.shape), f"must be {(bs, k)}")
    if mask is not None:
        c.tiling(mask.shape[0] == bs, "x_active_mask.shape[0]", mask.shape[0], f"must equal Bs={bs}")
        if mask.dim() == 2:
            c.tiling(mask.shape[1] == k, "x_active_mask.shape[1]", mask.shape[1], f"must equal K={k}")
    if shared_expert_x is not None:
        s = tuple(shared_expert_x.shape)
        ok = (s == (bs, h)) if len(s) == 2 else (s[0] * s[1] == bs and s[2] == h)
        c.tiling(ok, "shared_expert_x.shape", s, f"must be (Bs, H) = {(bs, h)} or (a, b, H) with a*b = Bs")
    if ori_x is not None:
        c.tiling(tuple(ori_x.shape) == (bs, h), "ori_x.shape", tuple(ori_x.shape), f"must be {(bs, h)}")
    const = cfg.const_expert_num
    for t, name in ((alpha1, "const_expert_alpha_1"), (alpha2, "const_expert_alpha_2")):
        if t is not None:
            c.tiling(t.shape[0] == const, f"{name}.shape[0]", t.shape[0], f"must equal const_expert_num={const}")
    if const_v is not None:
        c.tiling(tuple(const_v.shape) == (const, h), "const_expert_v.shape", tuple(const_v.shape), f"must be {(const, h)}")
    _window(c, geom)
    return geom


