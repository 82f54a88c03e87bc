"""The ``torch_npu`` module of mc2-emu: the MC2 operators, the MoE routing operators and the
helpers MoE clients call around them, computed on the CPU.  Each takes CPU or npu tensors (an
npu call returns npu tensors on the same device).  Any other ``npu_*`` name raises a clear
"not emulated" error when called.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from collections.abc import Callable

from .. import api
from . import routing
from .hccl import distribute_barrier
from .tensor import on_cpu

npu_moe_distribute_dispatch_v2 = api.moe_distribute_dispatch_v2
npu_moe_distribute_combine_v2 = api.moe_distribute_combine_v2
npu_moe_distribute_dispatch = api.moe_distribute_dispatch
npu_moe_distribute_combine = api.moe_distribute_combine
npu_moe_distribute_combine_add_rms_norm = api.moe_distribute_combine_add_rms_norm


def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """silu(a) * b with x = [a, b] split in halves along ``dim``, computed in fp32."""
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales: torch.Tensor | None = None, group_index=None,
                      dst_type=None, quant_mode: str = "pertoken") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: scale = max|x| / 127 over the last dim, y = round(x / scale)."""
    xf = x.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    return routing.dynamic_quant_rows(xf)


def _group_sizes(group_list: torch.Tensor | list | None, n: int, groups: int, group_list_type: int) -> list[int]:
    if group_list is None:
        return [n] + [0] * (groups - 1)
    g = [int(v) for v in (group_list.tolist() if isinstance(group_list, torch.Tensor) else group_list)]
    if group_list_type == 0:                                      # cumulative ends
        g = [e - s for s, e in zip([0] + g[:-1], g)]
    return g + [0] * (groups - len(g))


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, tuning_config=None):
    """Grouped matmul over consecutive row groups of x[0] (group_type 0): group g's rows times
    weight[g] (one (E, K, N) tensor or a list of (K, N)); ``group_list`` as counts
    (group_list_type 1) or cumulative ends (0).  int8 inputs: int32 accumulate, then
    * scale[g] (per output channel) * per_token_scale (per row), in ``output_dtype``
    (default bf16).  Returns a list holding one tensor (split_item 2/3) or one per group."""
    xs = x if isinstance(x, (list, tuple)) else [x]
    ws = weight if isinstance(weight, (list, tuple)) else [weight]
    w = ws[0] if len(ws) == 1 and ws[0].dim() == 3 else torch.stack(list(ws))
    inp = xs[0] if len(xs) == 1 else torch.cat(list(xs))
    sizes = _group_sizes(group_list, inp.shape[0], w.shape[0], group_list_type)
    quant = inp.dtype == torch.int8
    out_dtype = output_dtype or (torch.bfloat16 if quant else inp.dtype)
    outs, start = [], 0
    for g, n in enumerate(sizes[:w.shape[0]]):
        rows = inp[start:start + n]
        if quant:
            acc = (rows.to(torch.int32) @ w[g].to(torch.int32)).float()
            if scale is not None:
                sc = scale[0] if isinstance(scale, (list, tuple)) else scale
                acc = acc * sc[g].float()
            if per_token_scale is not None:
                pts = per_token_scale[0] if isinstance(per_token_scale, (list, tuple)) else per_token_scale
                acc = acc * pts[start:start + n].float()[:, None]
            y = acc
        else:
            y = rows.float() @ w[g].float()
        if bias is not None:
            b = bias[0] if isinstance(bias, (list, tuple)) else bias
            y = y + b[g].float()
        outs.append(y.to(out_dtype))
        start += n
    out = torch.cat(outs) if outs else torch.zeros(0, w.shape[-1], dtype=out_dtype)
    out = torch.cat([out, torch.zeros(inp.shape[0] - out.shape[0], out.shape[1], dtype=out.dtype)])
    return [out] if split_item in (2, 3) else outs


def npu_dequant_swiglu_quant(x, *, weight_scale=None, activation_scale=None, bias=None, quant_scale=None,
                             quant_offset=None, group_index=None, activate_left=False, quant_mode=0,
                             **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 x -> fp32 (* weight_scale of the row's group * activation_scale per row) ->
    swiglu (silu on the left half when ``activate_left``) -> per-token dynamic int8."""
    xf = x.float()
    if weight_scale is not None:
        ws = weight_scale.float()
        if ws.dim() == 2 and group_index is not None:
            sizes = _group_sizes(group_index, x.shape[0], ws.shape[0], 1 if kwargs.get("group_list_type", 1) else 0)
            ws = torch.repeat_interleave(ws[:len(sizes)], torch.tensor(sizes), dim=0, output_size=sum(sizes))
            ws = torch.cat([ws, torch.ones(x.shape[0] - ws.shape[0], ws.shape[1])])
        xf = xf * ws
    if activation_scale is not None:
        xf = xf * activation_scale.float().reshape(-1, 1)
    if bias is not None:
        xf = xf + bias.float()
    a, b = xf.chunk(2, dim=-1)
    y = F.silu(a) * b if activate_left else a * F.silu(b)
    return npu_dynamic_quant(y, smooth_scales=quant_scale)


def npu_format_cast(x: torch.Tensor, acl_format: int = 2, **kwargs) -> torch.Tensor:
    """Formats do not exist on the CPU: identity."""
    return x


def get_npu_format(x: torch.Tensor) -> int:
    return 2


class NotEmulated(AttributeError, NotImplementedError):
    """A torch_npu name mc2-emu does not provide (``hasattr`` sees False)."""


def _exports() -> dict[str, Callable]:
    """torch_npu's name -> the function, run on the CPU memory of npu arguments."""
    names = {n: f for n, f in globals().items() if n.startswith("npu_") and callable(f)}
    names.update({n: getattr(routing, n) for n in routing.__all__})
    names["_npu_distribute_barrier"] = distribute_barrier
    wrapped = {n: on_cpu(f) for n, f in names.items()}
    wrapped["get_npu_format"] = get_npu_format
    return wrapped


EXPORTS: dict[str, Callable] = _exports()


def _not_emulated(name: str) -> str:
    return (f"torch_npu.{name} is not emulated by mc2-emu (emulated: "
            f"{', '.join(sorted(n for n in EXPORTS if n.startswith('npu_')))})")


def __getattr__(name: str):
    """``npu_*`` names resolve to a stub that raises when called (libraries import many of them
    at load time, e.g. ``from torch_npu import npu_fusion_attention``); others raise at once."""
    if name.startswith("npu_"):
        def stub(*args, **kwargs):
            raise NotEmulated(_not_emulated(name))
        stub.__name__ = name
        stub.__doc__ = _not_emulated(name)
        return stub
    raise NotEmulated(_not_emulated(name))
