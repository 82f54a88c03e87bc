"""The tensors of one call, as one typed bundle per op (docs/dispatch.md names).

The API builds a bundle once from torch_npu's arguments and passes it unchanged to
validation, the chip's phases, the numerics, the single-process references and the test
scenarios.  Shapes use the notation of :mod:`emu.core.attrs` (XT: the activation dtype,
bf16 or fp16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attrs import MoeConfig


@dataclass(frozen=True)
class SpecialExperts:
    """Zero, copy and const experts of combine (docs/elastic.md, docs/combine.md).

    Ids ``[first, first + zero)`` are zero experts (they add nothing), the next ``copy`` ids
    copy experts (they add ``ori_x[t] * w``), the next ``const`` ids const experts (const
    expert c adds ``(ori_x[t] * alpha1[c] + v[c] * alpha2[c]) * w``).  ``first`` is the ORIGINAL
    ``moe_expert_num``, also under elastic scaling.  Dispatch never sends them anywhere.

    ori_x (Bs, H) XT; alpha1, alpha2 (const,) XT; v (const, H) XT; None when not given.
    """

    first: int = 0
    zero: int = 0
    copy: int = 0
    const: int = 0
    ori_x: torch.Tensor | None = None
    alpha1: torch.Tensor | None = None
    alpha2: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @classmethod
    def of(cls, cfg: MoeConfig, ori_x: torch.Tensor | None = None, alpha1: torch.Tensor | None = None,
           alpha2: torch.Tensor | None = None, v: torch.Tensor | None = None) -> "SpecialExperts":
        """The special experts of ``cfg`` with combine's tensors."""
        return cls(first=cfg.moe_expert_num, zero=cfg.zero_expert_num, copy=cfg.copy_expert_num,
                   const=cfg.const_expert_num, ori_x=ori_x, alpha1=alpha1, alpha2=alpha2, v=v)

    @property
    def count(self) -> int:
        return self.zero + self.copy + self.const

    def is_moe(self, ids: torch.Tensor) -> torch.Tensor:
        """Which ids are MoE experts: below ``first`` (every id when there are no special experts)."""
        return ids < self.first if self.count else torch.ones_like(ids, dtype=torch.bool)

    @property
    def copy_start(self) -> int:
        return self.first + self.zero

    @property
    def const_start(self) -> int:
        return self.first + self.zero + self.copy

    def tensors(self) -> tuple[tuple[torch.Tensor | None, str], ...]:
        """(tensor, torch_npu keyword) of every special-expert input."""
        return ((self.ori_x, "ori_x"), (self.alpha1, "const_expert_alpha_1"),
                (self.alpha2, "const_expert_alpha_2"), (self.v, "const_expert_v"))


DtypeLike = int | torch.dtype | None

# torch_npu's dtype codes (the torch.dtype enum values) of the dtypes these ops can name;
# torch_npu's own types (int4 285, hifloat8 290, float8_e8m0 293, float4 296 / 297) have no
# torch dtype and no kernel variant on A2 / A3.
NPU_DTYPE_CODES: dict[int, torch.dtype] = {
    0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 5: torch.float16,
    6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16, 23: torch.float8_e5m2,
    24: torch.float8_e4m3fn, 291: torch.float8_e5m2, 292: torch.float8_e4m3fn,
}
_CODE_OF = {dt: code for code, dt in sorted(NPU_DTYPE_CODES.items(), reverse=True)}


def dtype_code(value: DtypeLike) -> int | None:
    """The torch_npu code of ``value`` (a code or a ``torch.dtype``; None stays None)."""
    if isinstance(value, torch.dtype):
        return _CODE_OF.get(value, -1)
    return None if value is None else int(value)


def npu_dtype(value: DtypeLike) -> torch.dtype | None:
    """The torch dtype a code names (None: no code given, or a code without a torch dtype)."""
    code = dtype_code(value)
    return None if code is None else NPU_DTYPE_CODES.get(code)


@dataclass(frozen=True)
class DtypeArgs:
    """torch_npu 2.14's ``y_dtype`` / ``x_dtype`` / ``scales_dtype`` of dispatch_v2: the dtype the
    kernel writes expand_x in and reads x and scales as, each a torch_npu dtype code (the
    ``torch.dtype`` enum value, e.g. 15 for bfloat16; a ``torch.dtype`` is taken as its code)
    or None (the tensor's own dtype; for y, the one quant_mode implies)."""

    y: DtypeLike = None
    x: DtypeLike = None
    scales: DtypeLike = None

    def declared_x(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernel reads it: ``x_dtype`` relabels x's bytes (bf16 <-> fp16) when it names
        an activation dtype of x's element size; any other value is left for the checks."""
        want = npu_dtype(self.x)
        if want in (torch.bfloat16, torch.float16) and want != x.dtype and x.element_size() == 2:
            return x.view(want)
        return x


@dataclass(frozen=True)
class DispatchInputs:
    """One rank's dispatch tensors.

    x (Bs, H) XT; expert_ids (Bs, K) int32; scales (N_s + E, H) fp32 smooth scales (quant
    mode 2) or None; x_active_mask (Bs,) or (Bs, K) bool or None; expert_scales (Bs, K) fp32
    (read on A2 only) or None; elastic_info (4 + 2*W,) int32 or None; performance_info (W,)
    int64, accumulated in place, or None; dtypes: the declared dtypes (:class:`DtypeArgs`).
    """

    x: torch.Tensor
    expert_ids: torch.Tensor
    scales: torch.Tensor | None = None
    x_active_mask: torch.Tensor | None = None
    expert_scales: torch.Tensor | None = None
    elastic_info: torch.Tensor | None = None
    performance_info: torch.Tensor | None = None
    dtypes: DtypeArgs = DtypeArgs()


@dataclass(frozen=True)
class AddRmsNorm:
    """combine_add_rms_norm's extra inputs: after combine, ``x = combine + residual_x`` and
    ``y = RMSNorm(x) * gamma`` (docs/combine.md).

    residual_x (Bs, 1, H) bf16; gamma (H,) bf16; eps: norm_eps; reserved: the names of the
    inputs the op reserves (activation_scale, weight_scale, group_list) that were given.
    """

    residual_x: torch.Tensor | None
    gamma: torch.Tensor | None
    eps: float = 1e-6
    reserved: tuple[str, ...] = ()


@dataclass(frozen=True)
class CombineInputs:
    """One rank's combine tensors (docs/combine.md).

    expand_x (>= A*tp, H) XT: the expert outputs, aligned with dispatch's expand_x;
    expert_ids (Bs, K) int32 and x_active_mask as given to dispatch; assist_info
    (>= 128*A,) int32: dispatch's triples (V2), or with ``positional`` (V1) dispatch's
    expand_idx (Bs*K,) and the rows go back by position; ep_send_counts (>= W*L_r,) int32 =
    dispatch's ep_recv_counts; expert_scales (Bs, K) fp32; tp_send_counts (tp,) int32 (tp 2)
    or None; expand_scales (A,) fp32 (A2 hierarchy) or None; shared_expert_x (Bs, H) or
    (a, b, H) XT or None; special: the special experts; elastic_info, performance_info as in
    :class:`DispatchInputs`; norm: combine_add_rms_norm's inputs (None for plain combine).
    """

    expand_x: torch.Tensor
    expert_ids: torch.Tensor
    assist_info: torch.Tensor
    ep_send_counts: torch.Tensor
    expert_scales: torch.Tensor
    special: SpecialExperts = SpecialExperts()
    tp_send_counts: torch.Tensor | None = None
    x_active_mask: torch.Tensor | None = None
    expand_scales: torch.Tensor | None = None
    shared_expert_x: torch.Tensor | None = None
    elastic_info: torch.Tensor | None = None
    performance_info: torch.Tensor | None = None
    positional: bool = False
    norm: AddRmsNorm | None = None
