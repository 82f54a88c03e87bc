"""torch_npu 2.14.0's schema of every operator mc2-emu provides, as its codegen yaml
(``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``) declares it: the one source of
argument names, order, defaults, keyword-only split, types and return arity.  The registry
(:mod:`emu.npu.registry`) defines each as a dispatcher op in the ``npu`` namespace from these
strings; ``tests/test_npu_ops.py`` checks every string against the released wheel's yaml.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

MC2: tuple[str, ...] = (
    'npu_moe_distribute_dispatch(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, '
    'int ep_rank_id, int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, '
    'Tensor? expert_scales=None, str group_tp="", int tp_world_size=0, int tp_rank_id=0, '
    'int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int quant_mode=0, '
    'int global_bs=0, int expert_token_nums_type=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, '
    'Tensor)',
    'npu_moe_distribute_dispatch_v2(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, '
    'int ep_rank_id, int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, '
    'Tensor? expert_scales=None, Tensor? elastic_info=None, Tensor? performance_info=None, '
    'str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, '
    'int shared_expert_num=1, int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, '
    'int expert_token_nums_type=1, str comm_alg="", int zero_expert_num=0, int copy_expert_num=0, '
    'int const_expert_num=0, int? y_dtype=None, int? x_dtype=None, int? scales_dtype=None) -> (Tensor, '
    'Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)',
    'npu_moe_distribute_combine(Tensor expand_x, Tensor expert_ids, Tensor expand_idx, '
    'Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, '
    'int moe_expert_num, *, Tensor? tp_send_counts=None, Tensor? x_active_mask=None, '
    'Tensor? activation_scale=None, Tensor? weight_scale=None, Tensor? group_list=None, '
    'Tensor? expand_scales=None, Tensor? shared_expert_x=None, str group_tp="", int tp_world_size=0, '
    'int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, '
    'int global_bs=0, int out_dtype=0, int comm_quant_mode=0, int group_list_type=0) -> Tensor',
    'npu_moe_distribute_combine_v2(Tensor expand_x, Tensor expert_ids, Tensor assist_info_for_combine, '
    'Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, '
    'int moe_expert_num, *, Tensor? tp_send_counts=None, Tensor? x_active_mask=None, '
    'Tensor? expand_scales=None, Tensor? shared_expert_x=None, Tensor? elastic_info=None, '
    'Tensor? ori_x=None, Tensor? const_expert_alpha_1=None, Tensor? const_expert_alpha_2=None, '
    'Tensor? const_expert_v=None, Tensor? performance_info=None, str group_tp="", int tp_world_size=0, '
    'int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, '
    'int global_bs=0, int comm_quant_mode=0, str comm_alg="", int zero_expert_num=0, '
    'int copy_expert_num=0, int const_expert_num=0) -> Tensor',
    'npu_moe_distribute_combine_add_rms_norm(Tensor expand_x, Tensor expert_ids, Tensor expand_idx, '
    'Tensor ep_send_counts, Tensor expert_scales, Tensor residual_x, Tensor gamma, str group_ep, '
    'int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? tp_send_counts=None, '
    'Tensor? x_active_mask=None, Tensor? activation_scale=None, Tensor? weight_scale=None, '
    'Tensor? group_list=None, Tensor? expand_scales=None, Tensor? shared_expert_x=None, '
    'Tensor? elastic_info=None, Tensor? ori_x=None, Tensor? const_expert_alpha_1=None, '
    'Tensor? const_expert_alpha_2=None, Tensor? const_expert_v=None, str group_tp="", '
    'int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, '
    'int shared_expert_rank_num=0, int global_bs=0, int out_dtype=0, int comm_quant_mode=0, '
    'int group_list_type=0, str comm_alg="", float norm_eps=1e-06, int zero_expert_num=0, '
    'int copy_expert_num=0, int const_expert_num=0) -> (Tensor, Tensor, Tensor)',
    '_npu_distribute_barrier(Tensor x_ref, str group, int world_size, *, Tensor? time_out=None, '
    'Tensor? elastic_info=None) -> Tensor',
)

ROUTING: tuple[str, ...] = (
    'npu_moe_gating_top_k_softmax(Tensor x, Tensor? finished=None, int k=1) -> (Tensor, Tensor, Tensor)',
    'npu_moe_init_routing(Tensor x, Tensor row_idx, Tensor expert_idx, int active_num) -> (Tensor, '
    'Tensor, Tensor)',
    'npu_moe_init_routing_v2(Tensor x, Tensor expert_idx, *, Tensor? scale=None, Tensor? offset=None, '
    'int active_num=-1, int expert_capacity=-1, int expert_num=-1, int drop_pad_mode=0, '
    'int expert_tokens_num_type=0, bool expert_tokens_num_flag=False, int quant_mode=-1, '
    'int[2] active_expert_range=[], int row_idx_type=0, int? x_dtype=None) -> (Tensor, Tensor, Tensor, '
    'Tensor)',
    'npu_moe_finalize_routing(Tensor expanded_permuted_rows, Tensor? skip1, Tensor? skip2, Tensor? bias, '
    'Tensor? scales, Tensor expanded_src_to_dst_row, Tensor? export_for_source_row, '
    'int? drop_pad_mode=0, int? k=1) -> Tensor',
    'npu_moe_compute_expert_tokens(Tensor sorted_expert_for_source_row, int num_expert) -> Tensor',
    'npu_moe_re_routing(Tensor tokens, Tensor expert_token_num_per_rank, *, '
    'Tensor? per_token_scales=None, int expert_token_num_type=1, int idx_type=0, '
    'int? tokens_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)',
)

COMPUTE: tuple[str, ...] = (
    'npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, '
    'Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, '
    'Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, '
    'Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, '
    'int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, '
    'int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, '
    'int? per_token_scale_dtype=None) -> Tensor[]',
    'npu_grouped_matmul.List(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, '
    'Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, '
    'Tensor[]? per_token_scale=None, int[]? group_list=None, Tensor[]? activation_input=None, '
    'Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, '
    'int? group_type=None, int? group_list_type=0, int? act_type=0, '
    'ScalarType? output_dtype=None) -> Tensor[]',
    'npu_swiglu(Tensor self, int dim=-1) -> Tensor',
    'npu_dequant_swiglu_quant(Tensor x, *, Tensor? weight_scale=None, Tensor? activation_scale=None, '
    'Tensor? bias=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? group_index=None, '
    'bool activate_left=False, int quant_mode=0, int? dst_type=None, int? round_mode=None, '
    'int? activate_dim=None, int swiglu_mode=0, float clamp_limit=7.0, float glu_alpha=1.702, '
    'float glu_bias=1.0) -> (Tensor, Tensor)',
    'npu_moe_token_permute(Tensor tokens, Tensor indices, int? num_out_tokens=None, '
    'bool padded_mode=False) -> (Tensor, Tensor)',
    'npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs=None, '
    'bool padded_mode=False, int[]? restore_shape=None) -> Tensor',
    'npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None, '
    'int? dst_type=None, str quant_mode="pertoken", float dst_type_max=0.0) -> (Tensor, Tensor)',
)

FORMAT: tuple[str, ...] = (
    'npu_format_cast(Tensor self, int acl_format, *, int? customize_dtype=None, '
    'int? input_dtype=None) -> Tensor',
    'npu_format_cast.Tensor(Tensor self, Tensor dst, *, int? customize_dtype=None, int? input_dtype=None) '
    '-> Tensor',
    'get_npu_format(Tensor self) -> int',
)

SCHEMAS: tuple[str, ...] = MC2 + ROUTING + COMPUTE + FORMAT


def op_name(schema: str) -> str:
    """'npu_grouped_matmul.List(Tensor[] x, ...) -> Tensor[]' -> 'npu_grouped_matmul.List'."""
    return schema.split("(", 1)[0]


def bound_arguments(kernel: Callable, args: tuple, kwargs: dict) -> dict:
    """A dispatcher call's arguments by name, defaults filled in (the dispatcher passes only the
    keyword arguments given): fake kernels read them through their kernel's signature."""
    bound = inspect.signature(kernel).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
