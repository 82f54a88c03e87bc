"""Atlas A2 (Ascend910B) fullmesh path of dispatch / combine (spec a2.md §2).

Fullmesh moves tokens exactly as A3 does without shared experts (same expand_x layout, counts
and quantisation, the smooth row being the expert id), but its third output is the source-side
occurrence index ``occ[t*K + k]`` (how many earlier active slots of this rank chose the same
expert), and combine returns each row to its source by position: rows of block (l, p) go back
to p in order, and p reads slot (t, k) at ``windowOffset(e) + occ``, i.e. in its own slot order.
The hierarchy path (two hops through the servers) is in ``a2_hierarchy``.
"""
from __future__ import annotations

import torch

from . import a2_hierarchy
from . import combine as _combine
from . import dispatch as _dispatch
from .api import Prepared, _run
from .attrs import MoeConfig
from .comm import Call
from .layout import dispatch_shapes, lazy_zeros
from .npu.ops import expand_idx
from .placement import identity_remap
from .plan import active_set
from .validate import Checker, check_ids
from .validate_a2 import DISPATCH, COMBINE, validate_combine_a2, validate_dispatch_a2


def _config(ep_world_size: int, moe_expert_num: int, **kw) -> MoeConfig:
    """A2 forces tp, shared experts and the shard type to 0 (a2.md §1.2)."""
    return MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=0,
                     shared_expert_num=0, shared_expert_rank_num=0, **kw)


def dispatch(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales, x_active_mask,
             expert_scales, elastic_info, performance_info, group_tp, quant_mode, global_bs,
             expert_token_nums_type, comm_alg, zero_expert_num, copy_expert_num, const_expert_num):
    """A2 dispatch: the 7 outputs at torch_npu's eager shapes (a2.md §4): assist holds occ
    (Bs*K entries written), ep_recv_counts has E entries (+ 2*G*K*(W/8) zero tail entries when
    expert_scales is given), expand_scales is not written."""
    from .groups import group_label
    chosen = ["fullmesh"]
    cfg = _config(ep_world_size, moe_expert_num, quant_mode=quant_mode, global_bs=global_bs,
                  expert_token_nums_type=expert_token_nums_type, zero_expert_num=zero_expert_num,
                  copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)

    def validate():
        geom, alg = validate_dispatch_a2(x=x, expert_ids=expert_ids, ep_name=group_label(group_ep),
                                         tp_name=group_label(group_tp) if group_tp else "", cfg=cfg,
                                         ep_rank_id=ep_rank_id, scales=scales, mask=x_active_mask,
                                         expert_scales=expert_scales, elastic=elastic_info, comm_alg=comm_alg)
        chosen[0] = alg
        act = active_set(x.shape[0], expert_ids.shape[1], x_active_mask if alg == "fullmesh" else None)
        check_ids(Checker(DISPATCH), ep_rank_id, expert_ids, act.slots, moe_expert_num, moe_expert_num, 0)
        return Prepared(geom=geom, xt=x.dtype, remap=identity_remap(ep_world_size),
                        shapes=dispatch_shapes(geom, ep_rank_id, x.shape[0]))

    def body(call: Call, prep: Prepared):
        from .api import _add_wait
        if chosen[0] == "hierarchy":                      # mask ignored, two hops (a2.md §3)
            a2_hierarchy.server_domains(call)
            out = a2_hierarchy.dispatch(call, prep.route, prep.shapes, cfg, x, expert_ids, expert_scales)
            _add_wait(performance_info, call)
            return out.as_tuple()
        act = active_set(x.shape[0], expert_ids.shape[1], x_active_mask)
        out = _dispatch.dispatch(call, prep.route, prep.shapes, cfg, x, expert_ids, scales, act)
        out.assist_info_for_combine.zero_()
        occ = expand_idx(expert_ids, x_active_mask, moe_expert_num)
        n = int(act.tokens.sum()) * expert_ids.shape[1]
        out.assist_info_for_combine[:n] = occ[:n]
        if expert_scales is not None:                     # torch_npu sizes it for the hierarchy tail
            g = prep.geom
            tail = lazy_zeros((g.W * g.L + 2 * g.G * g.K * (g.W // 8),), torch.int32)
            tail[:g.W * g.L] = out.ep_recv_counts[:g.W * g.L]
            out.ep_recv_counts = tail
        _add_wait(performance_info, call)
        return out.as_tuple()

    return _run("dispatch", group_ep, "", cfg, ep_rank_id, 0, None, validate, body)


def combine(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size,
            ep_rank_id, moe_expert_num, *, x_active_mask, expand_scales, elastic_info, ori_x, const_expert_alpha_1,
            const_expert_alpha_2, const_expert_v, performance_info, group_tp, comm_quant_mode, comm_alg,
            zero_expert_num, copy_expert_num, const_expert_num, global_bs):
    """A2 fullmesh combine: rows back by position, out[t] = XT(sum_k fp32(y) * w) for active t."""
    from .groups import group_label
    chosen = ["fullmesh"]
    cfg = _config(ep_world_size, moe_expert_num, global_bs=global_bs, comm_quant_mode=comm_quant_mode,
                  zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                  const_expert_num=const_expert_num)
    inp = _combine.CombineInputs(expand_x=expand_x, expert_ids=expert_ids, assist_info=assist_info_for_combine,
                                 ep_send_counts=ep_send_counts, expert_scales=expert_scales,
                                 x_active_mask=x_active_mask)

    def validate():
        geom, alg = validate_combine_a2(expand_x=expand_x, expert_ids=expert_ids,
                                        assist_info=assist_info_for_combine, ep_send_counts=ep_send_counts,
                                        expert_scales=expert_scales, ep_name=group_label(group_ep),
                                        tp_name=group_label(group_tp) if group_tp else "", cfg=cfg,
                                        ep_rank_id=ep_rank_id, mask=x_active_mask, elastic=elastic_info,
                                        ori_x=ori_x, alpha1=const_expert_alpha_1, alpha2=const_expert_alpha_2,
                                        const_v=const_expert_v, comm_alg=comm_alg)
        chosen[0] = alg
        if alg == "hierarchy":
            Checker(COMBINE).tiling(expand_scales is not None, "expand_scales", None,
                                    "required with hierarchy (the hardware reads it; null faults the device)")
            Checker(COMBINE).tiling(cfg.comm_quant_mode == 0, "comm_quant_mode", cfg.comm_quant_mode,
                                    "mc2-emu does not emulate hierarchy int8 partials yet (a2.md §3.4 is opaque)")
        act = active_set(*expert_ids.shape, x_active_mask if alg == "fullmesh" else None)
        check_ids(Checker(COMBINE), ep_rank_id, expert_ids, act.slots, moe_expert_num, moe_expert_num, 0)
        return Prepared(geom=geom, xt=expand_x.dtype, remap=identity_remap(ep_world_size),
                        shapes=dispatch_shapes(geom, ep_rank_id, expert_ids.shape[0]))

    def body(call: Call, prep: Prepared):
        from .api import _add_wait
        if chosen[0] == "hierarchy":
            a2_hierarchy.server_domains(call)
            out = a2_hierarchy.combine(call, prep.route, cfg, expand_x, expert_ids, ep_send_counts, expand_scales)
            _add_wait(performance_info, call)
            return out
        act = active_set(*expert_ids.shape, x_active_mask)
        out = _combine.combine(call, prep.route, cfg, inp, act, positional=True)
        _add_wait(performance_info, call)
        return out

    return _run("combine", group_ep, "", cfg, ep_rank_id, 0, None, validate, body)
