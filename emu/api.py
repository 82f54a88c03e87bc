"""Public API with torch_npu's names, keywords and defaults (docs/dispatch.md).

Each function binds torch_npu's signature to one typed request (input bundle, attributes,
placement) and hands it to the chip the SoC setting selects (:mod:`emu.chips`).  Every rank
of the EP group (and, with tp_world_size = 2, of the TP group) must call them in the same
order, as on the NPU.
"""
from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from .chips import CHIPS, chip, run_combine, run_dispatch
from .comm.groups import group_label
from .core.attrs import MoeConfig
from .core.errors import TILING_ERROR, AclnnError
from .core.inputs import AddRmsNorm, CombineInputs, DispatchInputs, DtypeArgs, DtypeLike, SpecialExperts
from .core.plan import expand_idx
from .core.request import CombineRequest, DispatchRequest, Placement

GroupLike = ProcessGroup | str


def placement(group_ep: GroupLike, ep_rank_id: int, group_tp: GroupLike = "", tp_rank_id: int = 0,
              comm_alg: str = "") -> Placement:
    """Where this rank sits, with the group names the operator sees."""
    return Placement(group_ep=group_ep, ep_name=group_label(group_ep), ep_rank_id=ep_rank_id, group_tp=group_tp,
                     tp_name=group_label(group_tp), tp_rank_id=tp_rank_id,
                     comm_alg=comm_alg)


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
                               const_expert_num: int = 0, y_dtype: DtypeLike = None, x_dtype: DtypeLike = None,
                               scales_dtype: DtypeLike = None) -> tuple[torch.Tensor, ...]:
    """Dispatch tokens to experts (aclnnMoeDistributeDispatchV3).

    x (Bs, H) bf16/fp16; expert_ids (Bs, K) int32; scales (N_s + E, H) fp32 smooth scales
    (quant_mode 2); x_active_mask (Bs,) or (Bs, K) bool; expert_scales (Bs, K) fp32 (read by
    A2 hierarchy; given, it sizes ep_recv_counts for that path's tail on every chip).
    y_dtype / x_dtype / scales_dtype: torch_npu dtype codes (or torch dtypes) for expand_x, x
    and scales (A2 / A3: expand_x as quant_mode implies; x bf16 or fp16, relabelling x's
    bytes; scales fp32).  Returns torch_npu's eager allocation (docs/dispatch.md), with A the
    rows this rank may receive: expand_x ``(A*max(tp,1), H)`` x.dtype or int8; dynamic_scales
    ``(A*max(tp,1),)`` fp32; assist_info_for_combine ``(max(Bs*K, 128*A),)`` int32;
    expert_token_nums (L_r,) int64; ep_recv_counts ``(W*L_r*(2 if tp == 2 else 1),)`` int32, or
    ``(W*L_r + 2*G*K*(W//8),)`` with expert_scales; tp_recv_counts (tp,) int32; expand_scales
    (A,) fp32 (written by A2 hierarchy only).  Unwritten regions are zero.
    """
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode, global_bs=global_bs,
                    expert_token_nums_type=expert_token_nums_type, zero_expert_num=zero_expert_num,
                    copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    dtypes = DtypeArgs(y=y_dtype, x=x_dtype, scales=scales_dtype)
    inputs = DispatchInputs(x=dtypes.declared_x(x), expert_ids=expert_ids, scales=scales,
                            x_active_mask=x_active_mask, expert_scales=expert_scales, elastic_info=elastic_info,
                            performance_info=performance_info, dtypes=dtypes)
    req = DispatchRequest(inputs, cfg, placement(group_ep, ep_rank_id, group_tp, tp_rank_id, comm_alg))
    return run_dispatch(req).as_tuple()


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
                              const_expert_num: int = 0) -> torch.Tensor:
    """Combine expert outputs back to their tokens (aclnnMoeDistributeCombineV3).

    expand_x (>= A*tp, H) bf16/fp16 expert outputs aligned with dispatch's expand_x;
    expert_ids (Bs, K) int32 and x_active_mask as given to dispatch; assist_info_for_combine,
    ep_send_counts (= dispatch's ep_recv_counts) and tp_send_counts from dispatch;
    expert_scales (Bs, K) fp32.  Returns x_out (Bs, H) of expand_x's dtype (inactive tokens 0).
    """
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
                    comm_quant_mode=comm_quant_mode, zero_expert_num=zero_expert_num,
                    copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    special = SpecialExperts.of(cfg, ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v)
    inputs = CombineInputs(expand_x=expand_x, expert_ids=expert_ids, assist_info=assist_info_for_combine,
                           ep_send_counts=ep_send_counts, expert_scales=expert_scales, tp_send_counts=tp_send_counts,
                           x_active_mask=x_active_mask, expand_scales=expand_scales, shared_expert_x=shared_expert_x,
                           special=special, elastic_info=elastic_info, performance_info=performance_info)
    req = CombineRequest(inputs, cfg, placement(group_ep, ep_rank_id, group_tp, tp_rank_id, comm_alg))
    return run_combine(req)


def moe_distribute_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: GroupLike, ep_world_size: int,
                            ep_rank_id: int, moe_expert_num: int, *, scales: torch.Tensor | None = None,
                            x_active_mask: torch.Tensor | None = None, expert_scales: torch.Tensor | None = None,
                            group_tp: GroupLike = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                            expert_shard_type: int = 0, shared_expert_num: int = 1, shared_expert_rank_num: int = 0,
                            quant_mode: int = 0, global_bs: int = 0,
                            expert_token_nums_type: int = 1) -> tuple[torch.Tensor, ...]:
    """V1 dispatch (aclnnMoeDistributeDispatch): as V2, but the third output is ``expand_idx``
    (Bs*K int32): for each of this rank's slots (t, k), how many earlier active slots of this
    rank chose the same MoE expert (0 for inactive and special slots).  torch_npu allocates a
    shared rank ``G // S`` rows here (docs/dispatch.md)."""
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode, global_bs=global_bs,
                    expert_token_nums_type=expert_token_nums_type)
    inputs = DispatchInputs(x=x, expert_ids=expert_ids, scales=scales, x_active_mask=x_active_mask,
                            expert_scales=expert_scales)
    req = DispatchRequest(inputs, cfg, placement(group_ep, ep_rank_id, group_tp, tp_rank_id),
                          op="aclnnMoeDistributeDispatch", v1=True)
    outs = list(run_dispatch(req).as_tuple())
    outs[2] = expand_idx(expert_ids, x_active_mask, moe_expert_num)
    return tuple(outs)


def moe_distribute_combine(expand_x: torch.Tensor, expert_ids: torch.Tensor, expand_idx: torch.Tensor,
                           ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, group_ep: GroupLike,
                           ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
                           tp_send_counts: torch.Tensor | None = None, x_active_mask: torch.Tensor | None = None,
                           activation_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                           group_list: torch.Tensor | None = None, expand_scales: torch.Tensor | None = None,
                           shared_expert_x: torch.Tensor | None = None, group_tp: GroupLike = "",
                           tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                           shared_expert_num: int = 1, shared_expert_rank_num: int = 0, global_bs: int = 0,
                           out_dtype: int = 0, comm_quant_mode: int = 0, group_list_type: int = 0) -> torch.Tensor:
    """V1 combine (aclnnMoeDistributeCombine): rows go back by position (the holder's block
    order is the source's slot order), so ``expand_idx`` is only checked for shape (on A3:
    1-D, >= Bs*K entries; A2's tiling does not look at it, nor at the three inputs below)."""
    on = chip()
    if on is CHIPS["A3"]:
        for name, value in (("activation_scale", activation_scale), ("weight_scale", weight_scale),
                            ("group_list", group_list)):
            if value is not None:
                raise AclnnError(TILING_ERROR, f"aclnnMoeDistributeCombine: {name} must be null on Atlas A3")
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
                    comm_quant_mode=comm_quant_mode)
    inputs = CombineInputs(expand_x=expand_x, expert_ids=expert_ids, assist_info=expand_idx,
                           ep_send_counts=ep_send_counts, expert_scales=expert_scales, tp_send_counts=tp_send_counts,
                           x_active_mask=x_active_mask, expand_scales=expand_scales, shared_expert_x=shared_expert_x,
                           special=SpecialExperts.of(cfg), positional=True)
    req = CombineRequest(inputs, cfg, placement(group_ep, ep_rank_id, group_tp, tp_rank_id),
                         op="aclnnMoeDistributeCombine")
    return run_combine(req, on)


def moe_distribute_combine_add_rms_norm(
        expand_x: torch.Tensor, expert_ids: torch.Tensor, expand_idx: torch.Tensor, ep_send_counts: torch.Tensor,
        expert_scales: torch.Tensor, residual_x: torch.Tensor, gamma: torch.Tensor, group_ep: GroupLike,
        ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *, tp_send_counts: torch.Tensor | None = None,
        x_active_mask: torch.Tensor | None = None, activation_scale: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None, group_list: torch.Tensor | None = None,
        expand_scales: torch.Tensor | None = None, shared_expert_x: torch.Tensor | None = None,
        elastic_info: torch.Tensor | None = None, ori_x: torch.Tensor | None = None,
        const_expert_alpha_1: torch.Tensor | None = None, const_expert_alpha_2: torch.Tensor | None = None,
        const_expert_v: torch.Tensor | None = None, group_tp: GroupLike = "", tp_world_size: int = 0,
        tp_rank_id: int = 0, expert_shard_type: int = 0, shared_expert_num: int = 1,
        shared_expert_rank_num: int = 0, global_bs: int = 0, out_dtype: int = 0, comm_quant_mode: int = 0,
        group_list_type: int = 0, comm_alg: str = "", norm_eps: float = 1e-06, zero_expert_num: int = 0,
        copy_expert_num: int = 0, const_expert_num: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine, then residual add and RMSNorm in one op (aclnnMoeDistributeCombineAddRmsNormV2,
    Atlas A3 only, tp_world_size 0 or 1).

    The inputs of :func:`moe_distribute_combine_v2` (``expand_idx`` is dispatch_v2's
    assist_info_for_combine) plus residual_x (Bs, 1, H) bf16 and gamma (H,) bf16; expand_x bf16.
    activation_scale, weight_scale and group_list are reserved (must be None); out_dtype and
    group_list_type are not read.  Returns y (Bs, 1, H), rstd (Bs, 1, 1) fp32, x (Bs, 1, H): x =
    combine + residual_x, y = x * rstd * gamma in the kernel's rounding order (docs/combine.md);
    rows of inactive tokens zero.
    """
    cfg = MoeConfig(ep_world_size=ep_world_size, moe_expert_num=moe_expert_num, tp_world_size=tp_world_size,
                    expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                    shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
                    comm_quant_mode=comm_quant_mode, zero_expert_num=zero_expert_num,
                    copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    reserved = tuple(name for name, value in (("activation_scale", activation_scale), ("weight_scale", weight_scale),
                                              ("group_list", group_list)) if value is not None)
    special = SpecialExperts.of(cfg, ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v)
    inputs = CombineInputs(expand_x=expand_x, expert_ids=expert_ids, assist_info=expand_idx,
                           ep_send_counts=ep_send_counts, expert_scales=expert_scales, tp_send_counts=tp_send_counts,
                           x_active_mask=x_active_mask, expand_scales=expand_scales, shared_expert_x=shared_expert_x,
                           special=special, elastic_info=elastic_info,
                           norm=AddRmsNorm(residual_x, gamma, norm_eps, reserved))
    req = CombineRequest(inputs, cfg, placement(group_ep, ep_rank_id, group_tp, tp_rank_id, comm_alg),
                         op="aclnnMoeDistributeCombineAddRmsNormV2")
    return run_combine(req)


__all__ = ["moe_distribute_dispatch_v2", "moe_distribute_combine_v2", "moe_distribute_dispatch",
           "moe_distribute_combine", "moe_distribute_combine_add_rms_norm", "placement"]
