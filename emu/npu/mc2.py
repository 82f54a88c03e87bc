"""The MC2 operators as dispatcher kernels: mc2-emu's API runs them (:mod:`emu.api`), and their
fake kernels give the outputs' shapes and dtypes without data, communication or checks on
values, as torch_npu 2.14's meta functions do (docs/graph-mode.md).

Fake shapes are torch_npu's meta shapes (``dispatch_shapes(..., graph=True)``): expand_scales
has 0 entries unless ``expert_scales`` is given, where torch_npu's eager kernels (and mc2-emu's
default ``EMU_ALLOCATION=eager``) allocate A.  Every other output agrees with the eager kernel.
"""
from __future__ import annotations

import inspect

import torch

from .. import api
from ..core.attrs import Geometry, MoeConfig
from ..core.inputs import DtypeArgs
from ..core.layout import dispatch_shapes
from .hccl import distribute_barrier
from .schemas import bound_arguments

_CONFIG_FIELDS = tuple(inspect.signature(MoeConfig).parameters)


def _dispatch_outputs(a: dict, v1: bool) -> tuple[torch.Tensor, ...]:
    """The seven dispatch outputs of one rank, allocated as torch_npu's meta functions do."""
    x, ids = a["x"], a["expert_ids"]
    cfg = MoeConfig(**{k: a[k] for k in _CONFIG_FIELDS if k in a})
    geom = Geometry.of(cfg, x.shape[0], ids.shape[1], x.shape[1])
    s = dispatch_shapes(geom, a["ep_rank_id"], x.shape[0], elastic=a.get("elastic_info") is not None,
                        expert_scales=a["expert_scales"] is not None, v1=v1, graph=True)
    declared = DtypeArgs(y=a.get("y_dtype"), x=a.get("x_dtype")).declared_x(x).dtype
    quant = cfg.quant_mode != 0 or (v1 and a["scales"] is not None)
    assist = x.shape[0] * ids.shape[1] if v1 else s.assist
    return (x.new_empty((s.rows, x.shape[1]), dtype=torch.int8 if quant else declared),
            x.new_empty((s.dynamic_scales,), dtype=torch.float32), x.new_empty((assist,), dtype=torch.int32),
            x.new_empty((s.token_nums,), dtype=torch.int64), x.new_empty((s.ep_recv,), dtype=torch.int32),
            x.new_empty((s.tp_recv,), dtype=torch.int32), x.new_empty((s.expand_scales,), dtype=torch.float32))


def _dispatch_v2_fake(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    return _dispatch_outputs(bound_arguments(api.moe_distribute_dispatch_v2, args, kwargs), v1=False)


def _dispatch_fake(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    return _dispatch_outputs(bound_arguments(api.moe_distribute_dispatch, args, kwargs), v1=True)


def _combine_fake(expand_x: torch.Tensor, expert_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """x_out (Bs, H) in expand_x's dtype (combine V1 and V2)."""
    return expand_x.new_empty((expert_ids.shape[0], expand_x.shape[1]))


def _combine_add_rms_norm_fake(expand_x: torch.Tensor, expert_ids: torch.Tensor, *args,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (Bs, 1, H), rstd (Bs, 1, 1) fp32, x (Bs, 1, H)."""
    bs, h = expert_ids.shape[0], expand_x.shape[1]
    return (expand_x.new_empty((bs, 1, h)), expand_x.new_empty((bs, 1, 1), dtype=torch.float32),
            expand_x.new_empty((bs, 1, h)))


def _barrier_fake(x_ref: torch.Tensor, group: str, world_size: int, **kwargs) -> torch.Tensor:
    return torch.empty_like(x_ref)


#: schema name -> (kernel on CPU tensors, fake kernel), for :mod:`emu.npu.registry`.
KERNELS = {
    "npu_moe_distribute_dispatch": (api.moe_distribute_dispatch, _dispatch_fake),
    "npu_moe_distribute_dispatch_v2": (api.moe_distribute_dispatch_v2, _dispatch_v2_fake),
    "npu_moe_distribute_combine": (api.moe_distribute_combine, _combine_fake),
    "npu_moe_distribute_combine_v2": (api.moe_distribute_combine_v2, _combine_fake),
    "npu_moe_distribute_combine_add_rms_norm": (api.moe_distribute_combine_add_rms_norm, _combine_add_rms_norm_fake),
    "_npu_distribute_barrier": (distribute_barrier, _barrier_fake),
}
