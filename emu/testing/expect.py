"""What every rank should get: the single-process reference with torch_npu's keywords, and a
dense MoE to compare a whole dispatch -> experts -> combine pipeline with.

Per-rank arguments are lists indexed by world rank (with tp_world_size 2, world rank =
ep_rank * 2 + tp_rank); attributes are the operators' keywords (``ep_world_size``,
``moe_expert_num``, ``shared_expert_rank_num``, ``quant_mode`` ...).  The chip is ``soc``
(default: ``EMU_SOC``); on A2, ``comm_alg`` picks fullmesh or hierarchy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

import torch

from ..core.attrs import MoeConfig
from ..core.inputs import AddRmsNorm, CombineInputs, DispatchInputs, SpecialExperts
from ..core.numerics import add_rms_norm
from ..core.soc import a2_comm_alg, current_soc
from ..reference import a2 as ref_a2
from ..reference.a3 import reference_combine, reference_dispatch

_ATTRS = {f.name for f in fields(MoeConfig)}


def _config(attrs: dict, soc: str) -> MoeConfig:
    unknown = set(attrs) - _ATTRS
    if unknown:
        raise TypeError(f"unknown attributes {sorted(unknown)}; known: {sorted(_ATTRS)}")
    cfg = MoeConfig(**attrs)
    if soc == "A2":                                          # A2 forces these (docs/atlas-a2.md)
        cfg = replace(cfg, tp_world_size=0, shared_expert_num=0, shared_expert_rank_num=0)
    return cfg


def _at(values, r: int):
    return values[r] if isinstance(values, (list, tuple)) else values


def expected_dispatch(x: list[torch.Tensor], expert_ids: list[torch.Tensor], *, scales=None, x_active_mask=None,
                      expert_scales=None, elastic_info: torch.Tensor | None = None, soc: str | None = None,
                      comm_alg: str = "", **attributes) -> list[tuple | None]:
    """Every world rank's 7 dispatch outputs (None for ranks an active ``elastic_info`` removes)."""
    soc = (soc or current_soc()).upper()
    cfg = _config(attributes, soc)
    inputs = [DispatchInputs(x[r], expert_ids[r], _at(scales, r), _at(x_active_mask, r), _at(expert_scales, r))
              if x[r] is not None else None for r in range(len(x))]
    if soc != "A2":
        outs = reference_dispatch(cfg, inputs, elastic_info)
    elif a2_comm_alg(comm_alg, "expected_dispatch") == "hierarchy":
        outs = ref_a2.reference_dispatch_hierarchy(cfg, inputs, [_at(expert_scales, r) for r in range(len(x))])
    else:
        outs = ref_a2.reference_dispatch_a2(cfg, inputs, expert_scales is not None)
    return [o.as_tuple() if o is not None else None for o in outs]


def expected_combine(expand_x: list[torch.Tensor], expert_ids: list[torch.Tensor],
                     assist_info_for_combine: list[torch.Tensor], ep_send_counts: list[torch.Tensor],
                     expert_scales: list[torch.Tensor], *, tp_send_counts=None, x_active_mask=None,
                     expand_scales=None, shared_expert_x=None, ori_x=None, const_expert_alpha_1=None,
                     const_expert_alpha_2=None, const_expert_v=None, elastic_info: torch.Tensor | None = None,
                     soc: str | None = None, comm_alg: str = "", residual_x=None, gamma=None, norm_eps: float = 1e-6,
                     **attributes) -> list:
    """Every world rank's combine output x_out, given every rank's combine inputs (None
    entries for ranks an active ``elastic_info`` removes).  With ``residual_x`` and ``gamma``
    (per rank): combine_add_rms_norm's (y, rstd, x) instead."""
    soc = (soc or current_soc()).upper()
    cfg = _config(attributes, soc)
    inputs = [CombineInputs(
        expand_x=expand_x[r], expert_ids=expert_ids[r], assist_info=assist_info_for_combine[r],
        ep_send_counts=ep_send_counts[r], expert_scales=expert_scales[r], tp_send_counts=_at(tp_send_counts, r),
        x_active_mask=_at(x_active_mask, r), expand_scales=_at(expand_scales, r),
        shared_expert_x=_at(shared_expert_x, r),
        special=SpecialExperts.of(cfg, _at(ori_x, r), _at(const_expert_alpha_1, r), _at(const_expert_alpha_2, r),
                                  _at(const_expert_v, r)),
        norm=AddRmsNorm(_at(residual_x, r), _at(gamma, r), norm_eps) if residual_x is not None else None)
        if expand_x[r] is not None else None for r in range(len(expand_x))]
    if soc != "A2":
        return reference_combine(cfg, inputs, elastic_info)
    if a2_comm_alg(comm_alg, "expected_combine") == "hierarchy":
        return ref_a2.reference_combine_hierarchy(cfg, inputs, [_at(expand_scales, r) for r in range(len(inputs))])
    return ref_a2.reference_combine_a2(cfg, inputs)


def dense_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
              shared_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None, shared_num: int = 0,
              x_active_mask: torch.Tensor | None = None,
              norm: AddRmsNorm | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE layer computed densely on one rank, with combine's arithmetic.

    x (Bs, H); expert_ids (Bs, K) int32; weights (Bs, K) fp32; ``expert_fn(e, rows)`` -> the
    expert's output rows (n, H) for the rows routed to expert e; ``shared_fn(j, x)`` -> shared
    expert j's output (Bs, H), for j < ``shared_num``.  Returns x.dtype (Bs, H): per token,
    in fp32, sum over k in order of fp32(y_k) * w_k, then the shared outputs, rounded once;
    tokens a 1-D (prefix) or 2-D mask drops contribute nothing (zero rows).  With ``norm``
    (residual_x, gamma, eps): combine_add_rms_norm's (y, rstd, x) from the unrounded sum.
    Compare with a tolerance unless expert_fn gives every row the same output wherever it runs.
    """
    bs, k_num = expert_ids.shape
    on = torch.ones(bs, k_num, dtype=torch.bool)
    tokens = torch.ones(bs, dtype=torch.bool)
    if x_active_mask is not None and x_active_mask.dim() == 1:
        tokens = torch.arange(bs) < int(x_active_mask.sum())
        on = tokens[:, None].expand(bs, k_num).clone()
    elif x_active_mask is not None:
        on, tokens = x_active_mask.clone(), x_active_mask.any(dim=1)
    acc = torch.zeros(bs, x.shape[1], dtype=torch.float32)
    ids = expert_ids.to(torch.int64)
    for k in range(k_num):
        term = torch.zeros_like(acc)
        for e in ids[on[:, k], k].unique().tolist():
            rows = on[:, k] & (ids[:, k] == e)
            term[rows] = expert_fn(e, x[rows]).to(torch.float32) * weights[rows, k].to(torch.float32)[:, None]
        acc = acc + term
    for j in range(shared_num if shared_fn is not None else 0):
        acc = acc + shared_fn(j, x).to(torch.float32)
    if norm is not None:
        outs = add_rms_norm(acc, norm.residual_x, norm.gamma, norm.eps, x.dtype)
        for o in outs:
            o[~tokens] = 0
        return outs
    out = acc.to(x.dtype)
    out[~tokens] = 0
    return out
