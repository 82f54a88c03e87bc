"""Public API with torch_npu's names, keywords and defaults (spec §14).

``moe_distribute_dispatch_v2`` / ``moe_distribute_combine_v2`` run the operator on this
rank.  Every rank of the EP group (and, with tp_world_size = 2, of the TP group) must call
them in the same order, as on the NPU.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from . import combine as _combine
from . import dispatch as _dispatch
from .attrs import Geometry, MoeConfig
from .comm import Call, Domain
from .errors import PARAM_INVALID, TILING_ERROR, AclnnError
from .groups import group_label, resolve_group
from .layout import DispatchShapes, dispatch_shapes
from .placement import Remap, identity_remap
from .plan import active_set, warn_non_prefix_mask
from .soc import current_soc
from .validate import Checker, check_ids, check_remap, validate_combine, validate_dispatch

GroupLike = ProcessGroup | str

_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Prepared:
    """A validated call: original geometry, activation dtype, elastic remap, eager shapes."""

    geom: Geometry
    xt: torch.dtype
    remap: Remap
    shapes: DispatchShapes

    @property
    def route(self) -> Geometry:
        """Routing geometry (W', S', E' under active elastic scaling)."""
        return self.remap.routing(self.geom)


def prepare(geom: Geometry, xt: torch.dtype, cfg: MoeConfig, ep_rank_id: int, bs: int, elastic, op: str,
            expert_ids: torch.Tensor, mask) -> Prepared:
    """The checks after tiling: elastic table (when active), then ids (spec §7, §15)."""
    c = Checker(op)
    remap = Remap.parse(elastic, cfg.ep_world_size) if elastic is not None else identity_remap(cfg.ep_world_size)
    if remap.active:
        check_remap(c, remap, cfg, ep_rank_id)
    me = int(remap.to_new[ep_rank_id]) if remap.active else ep_rank_id
    act = active_set(bs, expert_ids.shape[1], mask)
    check_ids(c, me, expert_ids, act.slots, remap.new_moe if remap.active else cfg.moe_expert_num,
              cfg.moe_expert_num, cfg.special_num)
    return Prepared(geom=geom, xt=xt, remap=remap,
                    shapes=dispatch_shapes(geom, ep_rank_id, bs, elastic=elastic is not None))


def _domains(group_ep: GroupLike, group_tp: GroupLike, tp_world_size: int):
    """The EP / TP domains of the user's groups, or None where a group cannot be resolved."""
    ep_pg = resolve_group(group_ep)
    tp_pg = resolve_group(group_tp) if tp_world_size == 2 else None
    return (Domain.of("EP", ep_pg) if ep_pg is not None else None,
            Domain.of("TP", tp_pg) if tp_pg is not None else None)


def _elastic_domain(full: Domain, elastic, cfg: MoeConfig, ep_rank_id: int, op: str) -> Domain | None:
    """The EP domain of the call: the whole group, or under active elastic scaling the
    survivors alone (a subgroup only they create, spec §7).  None when the table is unusable."""
    if elastic is None:
        return full
    ok = (isinstance(elastic, torch.Tensor) and elastic.dtype == torch.int32 and elastic.dim() == 1
          and elastic.shape[0] == 4 + 2 * cfg.ep_world_size and 0 <= ep_rank_id < cfg.ep_world_size)
    if not ok:
        return None
    remap = Remap.parse(elastic, cfg.ep_world_size)
    if not remap.active:
        return full
    try:
        check_remap(Checker(op), remap, cfg, ep_rank_id)
    except AclnnError:
        return None
    return Domain.survivors(full, remap.survivors(), int(remap.to_new[ep_rank_id]))


def _group_checks(op: str, ep: Domain | None, tp: Domain | None, cfg: MoeConfig, ep_rank_id: int,
                  tp_rank_id: int, group_ep, group_tp) -> None:
    c = Checker(op)
    c.tiling(ep is not None, "group_ep", group_label(group_ep), "is not a known process group (emu.group_name)")
    c.tiling(ep.size == cfg.ep_world_size, "ep_world_size", cfg.ep_world_size,
             f"must equal the size of group_ep ({ep.size})")
    c.tiling(ep.rank == ep_rank_id, "ep_rank_id", ep_rank_id, f"must equal this rank's place in group_ep ({ep.rank})")
    if cfg.tp_world_size == 2:
        c.tiling(tp is not None, "group_tp", group_label(group_tp), "is not a known process group")
        c.tiling(tp.size == 2, "group_tp", group_label(group_tp), f"must have 2 ranks (has {tp.size})")
        c.tiling(tp.rank == tp_rank_id, "tp_rank_id", tp_rank_id, f"must equal this rank's place in group_tp ({tp.rank})")


def _agreed(cfg: MoeConfig, prep: Prepared, op: str, elastic) -> list[tuple[str, int]]:
    """Attributes every rank of the call must share (sent in the header)."""
    geom = prep.geom
    quant = ("quant_mode", cfg.quant_mode) if op == "dispatch" else ("comm_quant_mode", cfg.comm_quant_mode)
    table = 0
    if elastic is not None:
        table = int(zlib.crc32(elastic.numpy().tobytes())) & 0x7FFFFFFF
    return [("ep_world_size", cfg.ep_world_size), ("tp_world_size", cfg.tp_world_size),
            ("moe_expert_num", cfg.moe_expert_num), ("shared_expert_num", geom.Ns),
            ("shared_expert_rank_num", cfg.shared_expert_rank_num), quant,
            ("global_bs (or Bs*ep_world_size)", geom.G), ("zero_expert_num", cfg.zero_expert_num),
            ("copy_expert_num", cfg.copy_expert_num), ("const_expert_num", cfg.const_expert_num),
            ("K (expert_ids.shape[1])", geom.K), ("H (hidden size)", geom.H),
            ("activation dtype (1 bf16, 2 fp16)", _DTYPE_CODE.get(prep.xt, 0)),
            ("elastic_info (crc32)", table)]


def _run(op: str, group_ep, group_tp, cfg: MoeConfig, ep_rank_id: int, tp_rank_id: int, elastic,
         validate, body):
    """Validate, then run ``body(call, prepared)``.

    A rank whose input fails still takes part in the first exchange of each of its domains
    with an error marker, so that every peer raises at once instead of waiting; only a rank
    without a usable group (unknown group_ep, unusable elastic table) raises on its own.
    """
    full, tp = _domains(group_ep, group_tp, cfg.tp_world_size)
    prep, err = None, None
    try:
        prep = validate()
        _group_checks(op, full, tp, cfg, ep_rank_id, tp_rank_id, group_ep, group_tp)
    except AclnnError as exc:
        err = exc
    except (TypeError, AttributeError, ValueError, IndexError) as exc:     # e.g. a list for a tensor
        err = AclnnError(PARAM_INVALID, f"{op}: malformed argument ({type(exc).__name__}: {exc})")
    ep = _elastic_domain(full, elastic, cfg, ep_rank_id, op) if full is not None else None
    if ep is None:
        raise err if err is not None else AclnnError(TILING_ERROR, f"{op}: elastic_info is unusable")
    order = (["TP", "EP"] if op == "combine" else ["EP", "TP"]) if tp is not None else ["EP"]
    call = Call.start(op, ep, tp, _agreed(cfg, prep, op, elastic) if err is None else [], order)
    if err is not None:
        call.abort(err)
    return body(call, prep)


def moe_distribute_dispatch_v2(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: GroupLike,
                               ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
                               scales: torch.Tensor | None = None, x_active_mask: torch.Tensor | None = None,
                               expert_scales: torch.Tensor | None = None,
                               elastic_info: torch.Tensor | None = None,
                               performance_info: torch.Tensor | None = None, group_tp: GroupLike = "",
                               tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                               shared_expert_num: int = 1, shared_expert_rank_num: int = 0,
                               quant_mode: int = 0, global_bs: int = 0, expert_token_nums_type: int = 1,
                               comm_alg: str = "", zero_expert_num: int = 0, copy_expert_num: int = 0,
                               const_expert_num: int = 0) -> tuple[torch.Tensor, ...]:
    """Dispatch tokens to experts (aclnnMoeDistributeDispatchV3 on Atlas A3).

    x (Bs, H) bf16/fp16; expert_ids (Bs, K) int32; scales (N_s + E, H) fp32 smooth scales
    (quant_mode 2); x_active_mask (Bs,) or (Bs, K) bool.  Returns, with A as in spec §10.2:
    expand_x (A*max(tp,1), H) x.dtype or int8; dynamic_scales (A*tp if tp > 1 else A,) fp32;
    assist_info_for_combine (max(Bs*K, 128*A),) int32; expert_token_nums (L_r,) int64;
    ep_recv_counts (W*L_r*(2 if tp == 2 else 1),) int32; tp_recv_counts (tp,) int32;
    expand_scales (A,) fp32 (not produced on A3: zeros).  Unwritten regions are zero.
    """
    if current_soc() == "A2":
        from . import a2
        return a2.dispatch(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales=scales,
                           x_active_mask=x_active_mask, expert_scales=expert_scales, elastic_info=elastic_info,
                           performance_info=performance_info, group_tp=group_tp, quant_mode=quant_mode,
                           global_bs=global_bs, expert_token_nums_type=expert_token_nums_type, comm_alg=comm_alg,
                           zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                           const_expert_num=const_expert_num)
    del expert_scales                                   # ignored on A3 (spec §4.5)
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode, global_bs=global_bs,
                    expert_token_nums_type=expert_token_nums_type, zero_expert_num=zero_expert_num,
                    copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    op = "aclnnMoeDistributeDispatchV3"

    def validate():
        geom = validate_dispatch(x=x, expert_ids=expert_ids, ep_name=group_label(group_ep),
                                 tp_name=group_label(group_tp) if tp_world_size > 1 else "", cfg=cfg,
                                 ep_rank_id=ep_rank_id, tp_rank_id=tp_rank_id, scales=scales,
                                 mask=x_active_mask, elastic=elastic_info, comm_alg=comm_alg)
        warn_non_prefix_mask(x_active_mask)
        return prepare(geom, x.dtype, cfg, ep_rank_id, x.shape[0], elastic_info, op, expert_ids, x_active_mask)

    def body(call: Call, prep: Prepared):
        act = active_set(x.shape[0], expert_ids.shape[1], x_active_mask)
        out = _dispatch.dispatch(call, prep.route, prep.shapes, cfg, x, expert_ids, scales, act)
        _add_wait(performance_info, call)
        return out.as_tuple()

    return _run("dispatch", group_ep, group_tp, cfg, ep_rank_id, tp_rank_id, elastic_info, validate, body)


def moe_distribute_combine_v2(expand_x: torch.Tensor, expert_ids: torch.Tensor,
                              assist_info_for_combine: torch.Tensor, ep_send_counts: torch.Tensor,
                              expert_scales: torch.Tensor, group_ep: GroupLike, ep_world_size: int,
                              ep_rank_id: int, moe_expert_num: int, *,
                              tp_send_counts: torch.Tensor | None = None,
                              x_active_mask: torch.Tensor | None = None,
                              expand_scales: torch.Tensor | None = None,
                              shared_expert_x: torch.Tensor | None = None,
                              elastic_info: torch.Tensor | None = None, ori_x: torch.Tensor | None = None,
                              const_expert_alpha_1: torch.Tensor | None = None,
                              const_expert_alpha_2: torch.Tensor | None = None,
                              const_expert_v: torch.Tensor | None = None,
                              performance_info: torch.Tensor | None = None, group_tp: GroupLike = "",
                              tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                              shared_expert_num: int = 1, shared_expert_rank_num: int = 0,
                              global_bs: int = 0, comm_quant_mode: int = 0, comm_alg: str = "",
                              zero_expert_num: int = 0, copy_expert_num: int = 0,
                              const_expert_num: int = 0, _expand_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Combine expert outputs back to their tokens (aclnnMoeDistributeCombineV3 on A3).

    expand_x (>= A*tp, H) bf16/fp16 expert outputs aligned with dispatch's expand_x;
    (``_expand_idx``: the V1 entry point passes its expand_idx here, and no triples);
    expert_ids (Bs, K) int32 and x_active_mask as given to dispatch; assist_info_for_combine,
    ep_send_counts (= dispatch's ep_recv_counts) and tp_send_counts from dispatch;
    expert_scales (Bs, K) fp32.  Returns x_out (Bs, H) of expand_x's dtype (inactive tokens 0).
    """
    if current_soc() == "A2" and _expand_idx is None:
        from . import a2
        return a2.combine(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                          ep_world_size, ep_rank_id, moe_expert_num, x_active_mask=x_active_mask,
                          expand_scales=expand_scales, elastic_info=elastic_info, ori_x=ori_x, const_expert_alpha_1=const_expert_alpha_1,
                          const_expert_alpha_2=const_expert_alpha_2, const_expert_v=const_expert_v,
                          performance_info=performance_info, group_tp=group_tp, comm_quant_mode=comm_quant_mode,
                          comm_alg=comm_alg, zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                          const_expert_num=const_expert_num, global_bs=global_bs)
    del expand_scales                                   # ignored on A3 (spec §9.1)
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
                    comm_quant_mode=comm_quant_mode, zero_expert_num=zero_expert_num,
                    copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    op = "aclnnMoeDistributeCombineV3" if _expand_idx is None else "aclnnMoeDistributeCombine"
    v1 = _expand_idx is not None
    inp = _combine.CombineInputs(expand_x=expand_x, expert_ids=expert_ids, assist_info=assist_info_for_combine,
                                 ep_send_counts=ep_send_counts, expert_scales=expert_scales,
                                 tp_send_counts=tp_send_counts, x_active_mask=x_active_mask,
                                 shared_expert_x=shared_expert_x, ori_x=ori_x,
                                 const_expert_alpha_1=const_expert_alpha_1,
                                 const_expert_alpha_2=const_expert_alpha_2, const_expert_v=const_expert_v)

    def validate():
        geom = validate_combine(expand_x=expand_x, expert_ids=expert_ids,
                                assist_info=_expand_idx if v1 else assist_info_for_combine, v1=v1,
                                ep_send_counts=ep_send_counts, expert_scales=expert_scales,
                                ep_name=group_label(group_ep),
                                tp_name=group_label(group_tp) if tp_world_size > 1 else "", cfg=cfg,
                                ep_rank_id=ep_rank_id, tp_rank_id=tp_rank_id, tp_send_counts=tp_send_counts,
                                mask=x_active_mask, shared_expert_x=shared_expert_x, elastic=elastic_info,
                                ori_x=ori_x, alpha1=const_expert_alpha_1, alpha2=const_expert_alpha_2,
                                const_v=const_expert_v, comm_alg=comm_alg)
        prep = prepare(geom, expand_x.dtype, cfg, ep_rank_id, expert_ids.shape[0], elastic_info, op, expert_ids,
                       x_active_mask)
        me = int(prep.remap.to_new[ep_rank_id]) if prep.remap.active else ep_rank_id
        _combine.check_own_rows(prep.route, me, inp, _combine.own_rows(prep.route, me, inp), prep.shapes.capacity,
                                positional=v1)
        return prep

    def body(call: Call, prep: Prepared):
        act = active_set(*expert_ids.shape, x_active_mask)
        out = _combine.combine(call, prep.route, cfg, inp, act, positional=v1)
        _add_wait(performance_info, call)
        return out

    return _run("combine", group_ep, group_tp, cfg, ep_rank_id, tp_rank_id, elastic_info, validate, body)


def _add_wait(performance_info: torch.Tensor | None, call: Call) -> None:
    """Accumulate the microseconds this rank waited for each EP source (never cleared),
    indexed by the source's original EP rank."""
    if performance_info is not None and call.wait_us is not None:
        idx = torch.from_numpy(call.ep.ep_index)
        keep = idx < performance_info.numel()
        performance_info.view(-1).index_add_(0, idx[keep], torch.from_numpy(call.wait_us)[keep]
                                             .to(performance_info.dtype))


__all__ = ["moe_distribute_dispatch_v2", "moe_distribute_combine_v2", "AclnnError", "TILING_ERROR"]
