"""The compute operators between MoE gating and combine (emu.npu.compute): hand-worked values,
the operators' rejections, the fake kernels against the kernels, and (with the torch_npu
2.14.0 wheel) the fake kernels against the wheel's own meta functions."""
from __future__ import annotations

import inspect
import math
import struct

import npu_wheel
import pytest
import torch

from emu.core.errors import PARAM_INVALID, PARAM_NULLPTR, TILING_ERROR, AclnnError, ContractWarning
from emu.npu import compute, registry  # noqa: F401 (registry: torch.ops.npu)
from emu.npu.compute import (
    npu_dequant_swiglu_quant,
    npu_dynamic_quant,
    npu_grouped_matmul,
    npu_grouped_matmul_list,
    npu_moe_token_permute,
    npu_moe_token_unpermute,
    npu_swiglu,
)

pytestmark = pytest.mark.timeout(120)

BF16, F16, F32, I8, I32, I64 = torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int32, torch.int64


def t(values, dtype=F32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def raises_code(code: int, call, match: str | None = None):
    with pytest.raises(AclnnError, match=match) as info:
        call()
    assert info.value.code == code
    return info.value


# ============================================================================ npu_swiglu

def test_swiglu_last_dim_by_hand():
    out = npu_swiglu(t([[0.0, 2.0, 3.0, 4.0]]))
    assert out.dtype == F32 and out.shape == (1, 2)
    assert torch.allclose(out, t([[0.0, silu(2.0) * 4.0]]), rtol=1e-6, atol=0)


def test_swiglu_dim_0_and_bf16_rounding():
    x = t([[1.0, -1.0, 2.0], [2.0, 0.5, 1.0]], BF16)
    out = npu_swiglu(x, dim=0)
    want = [[silu(1.0) * 2.0, silu(-1.0) * 0.5, silu(2.0) * 1.0]]
    assert out.dtype == BF16 and torch.equal(out, t(want).to(BF16))


@pytest.mark.parametrize("call, match", [
    (lambda: npu_swiglu(torch.zeros(2, 3)), "even"),
    (lambda: npu_swiglu(torch.zeros(2, 4, dtype=I32)), "dtype"),
    (lambda: npu_swiglu(torch.zeros(2, 4), dim=2), "out of range"),
    (lambda: npu_swiglu(torch.tensor(1.0)), "at least one"),
])
def test_swiglu_rejects(call, match):
    raises_code(PARAM_INVALID, call, match)


# ============================================================================ npu_dynamic_quant

def test_dynamic_quant_by_hand():
    y, s = npu_dynamic_quant(t([[1.0, -3.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]], BF16))
    assert y.dtype == I8 and s.dtype == F32 and s.shape == (2,)
    assert y.tolist() == [[32, -95, 16, 127], [0, 0, 0, 0]]      # 1 / (4/127) = 31.75, -3 / (4/127) = -95.25
    assert torch.allclose(s, t([4.0 / 127, 0.0]))


def test_dynamic_quant_smooth_scales_and_groups():
    y, s = npu_dynamic_quant(t([[1.0, 2.0]], BF16), smooth_scales=t([2.0, 0.25], BF16))
    assert y.tolist() == [[127, 32]] and torch.allclose(s, t([2.0 / 127]))   # x * s = [2, 0.5]
    x = t([[1.5, 1.0], [1.0, 2.0], [4.0, 1.5]], F16)
    smooth = t([[1.0, 2.0], [0.5, 1.0]], F16)
    y, s = npu_dynamic_quant(x, smooth_scales=smooth, group_index=t([1, 3], I32))
    # row 0 * [1, 2] = [1.5, 2]; rows 1, 2 * [0.5, 1] = [0.5, 2], [2, 1.5]: 95.25, 31.75, 95.25
    assert y.tolist() == [[95, 127], [32, 127], [127, 95]]
    assert torch.allclose(s, t([2.0 / 127, 2.0 / 127, 2.0 / 127]))


def test_dynamic_quant_keeps_leading_dims():
    y, s = npu_dynamic_quant(torch.ones(2, 3, 4, dtype=BF16))
    assert y.shape == (2, 3, 4) and s.shape == (2, 3) and bool((y == 127).all())


@pytest.mark.parametrize("call, error, match", [
    (lambda: npu_dynamic_quant(torch.ones(3, 4)), AclnnError, "float16 or bfloat16"),
    (lambda: npu_dynamic_quant(torch.ones(4, dtype=BF16)), AclnnError, "more than one dimension"),
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), quant_mode="pertensor"), NotImplementedError,
     "pertensor"),
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), quant_mode="other"), AclnnError, "quant_mode"),
    # dst_type: int8 and int4 (quint4x2) are A2 / A3's outputs; a torch_npu code of another dtype is refused
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), dst_type=290), AclnnError,
     "torch_npu.hifloat8 is not supported"),
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), dst_type=torch.float16), AclnnError, "not supported"),
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), dst_type=torch.quint4x2), AclnnError, "divded by 8"),
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), smooth_scales=torch.ones(4)), AclnnError, "dtype"),
    (lambda: npu_dynamic_quant(torch.ones(2, 4, dtype=BF16), group_index=t([2], I32)), AclnnError,
     "needs smooth_scales"),
])
def test_dynamic_quant_rejects(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_dynamic_quant_int4_packs_eight_values_per_int32():
    """dst_type torch.quint4x2 (torch_npu's int4 output, as Huawei's int4 tests call it): scale = max / 7,
    y = rint(x * 7 / max) in [-8, 7], eight to an int32 word, low nibble first (the tests' unpacking reads
    the word's bytes low nibble then high nibble)."""
    x = t([[7.0, -7.0, 3.5, 0.0, 1.0, -1.0, 6.0, -3.0]], F16)
    y, s = npu_dynamic_quant(x, dst_type=torch.quint4x2)
    assert y.dtype == I32 and y.shape == (1, 1) and torch.allclose(s, t([1.0]))
    nibbles = [(int(y[0, 0]) >> (4 * j)) & 0xF for j in range(8)]
    assert [v - 16 if v > 7 else v for v in nibbles] == [7, -7, 4, 0, 1, -1, 6, -3]       # 3.5 -> 4 (half to even)
    assert torch.ops.npu.npu_dynamic_quant(x.to("meta"), dst_type=torch.quint4x2)[0].shape == (1, 1)


def test_dynamic_quant_group_index_out_of_contract_warns():
    """group_index whose last end is not the row count: the docs call the result meaningless, the kernel
    computes it; rows past the last end keep a smooth scale of 1 (Huawei's golden leaves them as they are)."""
    x = torch.ones(2, 4, dtype=BF16)
    with pytest.warns(ContractWarning, match="end at the row count"):
        _, s = npu_dynamic_quant(x, smooth_scales=torch.full((1, 4), 2.0, dtype=BF16), group_index=t([1], I32))
    assert torch.allclose(s, t([2.0 / 127, 1.0 / 127]))


# ============================================================================ npu_dequant_swiglu_quant

def _dsq_x(rows: list[tuple[tuple[int, int], tuple[int, int]]], width: int = 64) -> torch.Tensor:
    """int32 x (len(rows), width): row r has its act pair in columns 0, 1 and its gate pair in
    columns width/2, width/2 + 1, zeros elsewhere."""
    x = torch.zeros(len(rows), width, dtype=I32)
    for r, (a, b) in enumerate(rows):
        x[r, 0:2] = t(a, I32)
        x[r, width // 2:width // 2 + 2] = t(b, I32)
    return x


def test_dequant_swiglu_quant_groups_by_hand():
    """vllm-ascend's w8a8 call: int32 x, per-group weight_scale (G, 2H), per-row activation_scale,
    group_index = counts, activate_left, dynamic quant; rows past the groups stay 0."""
    x = _dsq_x([((2, 1), (3, 4)), ((4, -8), (8, 4)), ((5, 5), (5, 5))])
    ws = torch.stack([torch.full((64,), 0.5), torch.full((64,), 0.25)])
    y, s = npu_dequant_swiglu_quant(x, weight_scale=ws, activation_scale=t([2.0, 1.0, 1.0]),
                                    group_index=t([1, 1], I64), activate_left=True, quant_mode=1)
    assert y.shape == (3, 32) and y.dtype == I8 and s.shape == (3,) and s.dtype == F32
    out0 = [silu(2.0) * 3.0, silu(1.0) * 4.0]           # row 0: x * 0.5 * 2
    out1 = [silu(1.0) * 2.0, silu(-2.0) * 1.0]          # row 1: x * 0.25 * 1
    s0, s1 = max(map(abs, out0)) / 127, max(map(abs, out1)) / 127
    assert torch.allclose(s, t([s0, s1, 0.0]), rtol=1e-6)
    assert y[0, :2].tolist() == [127, round(out0[1] / s0)] == [127, 70]
    assert y[1, :2].tolist() == [127, round(out1[1] / s1)] == [127, -21]
    assert int(y[:, 2:].abs().sum()) == 0 and int(y[2].abs().sum()) == 0


def test_dequant_swiglu_quant_activate_right_and_negative_count():
    x = _dsq_x([((3, 4), (2, 1))])
    y, s = npu_dequant_swiglu_quant(x, weight_scale=torch.ones(1, 64), group_index=t([-2, 1], I64)[1:],
                                    activate_left=False, quant_mode=1)
    out = [silu(2.0) * 3.0, silu(1.0) * 4.0]            # SiLU on the right half
    assert torch.allclose(s, t([out[0] / 127]), rtol=1e-6) and y[0, :2].tolist() == [127, 70]
    y2, s2 = npu_dequant_swiglu_quant(x, weight_scale=torch.ones(2, 64), group_index=t([-2, 1], I64),
                                      activate_left=False, quant_mode=1)
    assert torch.equal(y2, y) and torch.equal(s2, s)     # a negative count is skipped


def test_dequant_swiglu_quant_smooth_scale_per_group():
    x = _dsq_x([((2, 1), (3, 4))])
    qs = torch.ones(1, 32)
    qs[0, 1] = 2.0
    y, s = npu_dequant_swiglu_quant(x, weight_scale=torch.ones(64), quant_scale=qs, group_index=t([1], I64),
                                    activate_left=True, quant_mode=1)
    out = [silu(2.0) * 3.0, silu(1.0) * 4.0 * 2.0]       # 5.28, 5.85: the second is the max now
    assert torch.allclose(s, t([out[1] / 127]), rtol=1e-6) and y[0, :2].tolist() == [round(out[0] / out[1] * 127),
                                                                                    127]


def test_dequant_swiglu_quant_gpt_oss_variants():
    """swiglu_mode 1: act = even columns, gate = odd; 2: halves; act clamped above at clamp_limit,
    gate to [-limit, limit] then + glu_bias; out = act * sigmoid(glu_alpha * act) * gate."""
    def variant(a: float, b: float) -> float:
        a, b = min(a, 7.0), max(min(b, 7.0), -7.0) + 1.0
        return a / (1.0 + math.exp(-1.702 * a)) * b

    x = torch.zeros(1, 64, dtype=I32)
    x[0, :4] = t([1, 2, 10, -9], I32)
    y, s = npu_dequant_swiglu_quant(x, weight_scale=torch.ones(64), group_index=t([1], I64), activate_left=True,
                                    quant_mode=1, swiglu_mode=1)
    out = [variant(1.0, 2.0), variant(10.0, -9.0)]      # 2.54, -42.0
    assert torch.allclose(s, t([abs(out[1]) / 127]), rtol=1e-6)
    assert y[0, :2].tolist() == [round(out[0] / abs(out[1]) * 127), -127] == [8, -127]
    x2 = _dsq_x([((1, 10), (2, -9))])
    y2, s2 = npu_dequant_swiglu_quant(x2, weight_scale=torch.ones(64), group_index=t([1], I64), activate_left=True,
                                      quant_mode=1, swiglu_mode=2)
    assert torch.equal(y2[0, :2], y[0, :2]) and torch.allclose(s2, s)


def test_dequant_swiglu_quant_without_groups():
    """bf16 x (vllm-ascend's NPUSwigluQuant) and int32 x with one weight_scale row."""
    y, s = npu_dequant_swiglu_quant(t([[1.0, 2.0, 3.0, 4.0]], BF16), activate_left=True, quant_mode=1)
    out = [silu(1.0) * 3.0, silu(2.0) * 4.0]
    assert torch.allclose(s, t([out[1] / 127]), rtol=1e-6) and y.tolist() == [[round(out[0] / out[1] * 127), 127]]
    x = t([[4, 8, 6, 2]], I32)
    y2, s2 = npu_dequant_swiglu_quant(x, weight_scale=t([0.25, 0.25, 0.5, 2.0]), activation_scale=t([[1.0]]),
                                      bias=t([0, 0, 0, 2], I32), activate_left=True, quant_mode=1)
    out2 = [silu(1.0) * 3.0, silu(2.0) * 8.0]           # bias (int32) before the scales: 2 + 2 = 4 -> * 2
    assert torch.allclose(s2, t([out2[1] / 127]), rtol=1e-6)
    assert y2.tolist() == [[round(out2[0] / out2[1] * 127), 127]]


@pytest.mark.parametrize("call, code, match", [
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=I32), group_index=t([2], I64), quant_mode=1),
     PARAM_NULLPTR, "weight_scale is required"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 8, dtype=I32), weight_scale=torch.ones(8),
                                      group_index=t([2], I64), quant_mode=1), PARAM_INVALID, "divisible by 64"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=I32), weight_scale=torch.ones(64),
                                      bias=torch.zeros(64, dtype=I32), group_index=t([2], I64), quant_mode=1),
     PARAM_INVALID, "bias must be None"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=I32), weight_scale=torch.ones(3, 64),
                                      group_index=t([1, 1], I64), quant_mode=1), PARAM_INVALID, "weight_scale shape"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=I32), weight_scale=torch.ones(64),
                                      group_index=t([2], I32), quant_mode=1), PARAM_INVALID, "int64"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=BF16), quant_offset=torch.ones(32), quant_mode=1),
     PARAM_INVALID, "quant_offset"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=BF16), weight_scale=torch.ones(64), quant_mode=1),
     PARAM_INVALID, "unless x is int32"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=F16), quant_mode=1), PARAM_INVALID, "int32 or bf"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 63, dtype=BF16), quant_mode=1), PARAM_INVALID, "even"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=BF16), quant_mode=2), PARAM_INVALID, "quant_mode"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=BF16), quant_mode=1, swiglu_mode=3), PARAM_INVALID,
     "swiglu_mode"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=BF16), quant_mode=1, clamp_limit=0.0), PARAM_INVALID,
     "clamp_limit"),
    (lambda: npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=I32), weight_scale=torch.ones(64),
                                      activation_scale=torch.ones(3), quant_mode=1), PARAM_INVALID,
     "activation_scale"),
])
def test_dequant_swiglu_quant_rejects(call, code, match):
    raises_code(code, call, match)


def test_dequant_swiglu_quant_static_quant_not_emulated():
    with pytest.raises(NotImplementedError, match="quant_mode=0"):
        npu_dequant_swiglu_quant(torch.zeros(2, 64, dtype=BF16), quant_mode=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"dst_type": 23}, "dst_type=torch.float8_e5m2 is ignored"),
    ({"round_mode": 2}, "round_mode=2 is ignored"),
    ({"activate_dim": 0}, "activate_dim=0 is ignored"),
    ({"swiglu_mode": 1, "activate_left": True}, "without group_index is ignored"),
])
def test_dequant_swiglu_quant_what_a2_a3_ignore_warns(kwargs, match, monkeypatch):
    """Below Ascend 950 torch_npu does not pass dst_type, round_mode, activate_dim on
    (DequantSwigluQuantOpApi.cpp: int8, rint, the last dim) and the kernel without group_index computes
    swiglu_mode 0: the result is the default call's, with a ContractWarning; EMU_STRICT=1 raises."""
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(BF16)
    want = npu_dequant_swiglu_quant(x, quant_mode=1, activate_left=kwargs.get("activate_left", False))
    with pytest.warns(ContractWarning, match=match):
        got = npu_dequant_swiglu_quant(x, quant_mode=1, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    monkeypatch.setenv("EMU_STRICT", "1")
    raises_code(PARAM_INVALID, lambda: npu_dequant_swiglu_quant(x, quant_mode=1, **kwargs), match)


def test_dequant_swiglu_quant_groups_past_the_rows_warn():
    """group_index counts summing past x's rows: the device reads past x; here the groups stop at the rows."""
    x = torch.ones(2, 64, dtype=I32)
    with pytest.warns(ContractWarning, match="must not exceed"):
        y, _ = npu_dequant_swiglu_quant(x, weight_scale=torch.ones(2, 64), group_index=t([2, 1], I64), quant_mode=1)
    assert y.shape == (2, 32)


# ============================================================================ npu_moe_token_permute / unpermute

DOC_TOKENS = t([[1, 1], [2, 2], [3, 3], [4, 4]], F16)
DOC_INDICES = [[0, 1], [1, 0], [0, 2], [2, 0]]
DOC_PERMUTED = t([[1, 1], [2, 2], [3, 3], [4, 4], [1, 1], [2, 2], [3, 3], [4, 4]], F16)
DOC_SORTED = [0, 4, 5, 1, 2, 6, 7, 3]


@pytest.mark.parametrize("dtype", [I32, I64])
def test_permute_docs_example(dtype):
    """torch_npu's docs example: the expert-sorted copies and, per choice t * K + k, its row."""
    permuted, sorted_indices = npu_moe_token_permute(DOC_TOKENS, t(DOC_INDICES, dtype))
    assert torch.equal(permuted, DOC_PERMUTED) and sorted_indices.dtype == I32
    assert sorted_indices.tolist() == DOC_SORTED


def test_permute_ties_keep_choice_order_and_one_d_indices():
    """Equal experts keep the flat (token, k) order: the kernel's Sort32 / MrgSort pick the lower
    index first; 1-D indices are top-1."""
    tokens = t([[1, 0], [0, 1]], BF16)
    permuted, sorted_indices = npu_moe_token_permute(tokens, t([[5, 5], [5, 5]], I32))
    assert permuted.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]] and sorted_indices.tolist() == [0, 1, 2, 3]
    permuted, sorted_indices = npu_moe_token_permute(t([[1.0], [2.0], [3.0]]), t([2, 0, 2], I64))
    assert permuted.tolist() == [[2.0], [1.0], [3.0]] and sorted_indices.tolist() == [1, 0, 2]


@pytest.mark.parametrize("num_out_tokens, rows", [(None, 8), (0, 8), (5, 5), (100, 8), (-3, 5), (-8, 0)])
def test_permute_num_out_tokens(num_out_tokens, rows):
    permuted, sorted_indices = npu_moe_token_permute(DOC_TOKENS, t(DOC_INDICES, I32), num_out_tokens)
    assert torch.equal(permuted, DOC_PERMUTED[:rows]) and sorted_indices.tolist() == DOC_SORTED


@pytest.mark.parametrize("call, code, match", [
    (lambda: npu_moe_token_permute(DOC_TOKENS, t(DOC_INDICES, I32), padded_mode=True), TILING_ERROR, "padded_mode"),
    (lambda: npu_moe_token_permute(DOC_TOKENS, t(DOC_INDICES, I32), -9), PARAM_INVALID, "negative"),
    (lambda: npu_moe_token_permute(DOC_TOKENS[None], t(DOC_INDICES, I32)), PARAM_INVALID, "tokens should be 2"),
    (lambda: npu_moe_token_permute(DOC_TOKENS, t([DOC_INDICES], I32)), PARAM_INVALID, "indices should be 2 or 1"),
    (lambda: npu_moe_token_permute(DOC_TOKENS.to(I8), t(DOC_INDICES, I32)), PARAM_INVALID, "tokens dtype"),
    (lambda: npu_moe_token_permute(DOC_TOKENS, t(DOC_INDICES, I8)), PARAM_INVALID, "indices dtype"),
    (lambda: npu_moe_token_permute(DOC_TOKENS[:3], t(DOC_INDICES, I32)), TILING_ERROR, "same with indices"),
    (lambda: npu_moe_token_permute(torch.ones(1, 2), torch.zeros(1, 513, dtype=I32)), TILING_ERROR, "topK"),
])
def test_permute_rejects(call, code, match):
    raises_code(code, call, match)


def test_unpermute_docs_example_and_inverse_of_permute():
    out = npu_moe_token_unpermute(DOC_PERMUTED, t(DOC_SORTED, I32), probs=torch.full((4, 2), 0.5, dtype=F16))
    assert out.dtype == F16 and torch.equal(out, DOC_TOKENS)
    tokens = torch.randn(6, 3)
    indices = torch.randint(0, 4, (6,), dtype=I32)
    permuted, sorted_indices = npu_moe_token_permute(tokens, indices)
    assert torch.equal(npu_moe_token_unpermute(permuted, sorted_indices), tokens)


def test_unpermute_weights_and_dropped_rows():
    """out[t] = sum_k row(sorted_indices[t*K+k]) * probs[t, k]; an index past the permuted rows
    (dropped by num_out_tokens) or a zero prob adds nothing, even to an inf row."""
    permuted = t([[1.0, 2.0], [10.0, 20.0], [float("inf"), 0.0]])
    out = npu_moe_token_unpermute(permuted, t([0, 1, 2, 5], I32), probs=t([[0.25, 0.5], [0.0, 3.0]]))
    assert out.tolist() == [[0.25 + 5.0, 0.5 + 10.0], [0.0, 0.0]]


def test_unpermute_accumulates_in_fp32_in_k_order():
    """bf16: one rounding of the fp32 sum (1 + 3 * 2^-8 -> 1.015625; bf16 steps would stay at 1);
    fp32: k order, 2^24 + 1 + 1 stays 2^24 (adding the ones first would give 2^24 + 2)."""
    rows = t([[1.0], [2.0 ** -8], [2.0 ** -8], [2.0 ** -8]], BF16)
    out = npu_moe_token_unpermute(rows, t([0, 1, 2, 3], I32), probs=torch.ones(1, 4, dtype=BF16))
    assert out.item() == 1.015625
    big = t([[2.0 ** 24], [1.0], [1.0]])
    assert npu_moe_token_unpermute(big, t([0, 1, 2], I32), probs=torch.ones(1, 3)).item() == 2.0 ** 24


def test_unpermute_ignores_padded_mode_like_the_a2_a3_kernel():
    out = npu_moe_token_unpermute(DOC_PERMUTED, t(DOC_SORTED, I32), torch.full((4, 2), 0.5, dtype=F16), True, [4, 2])
    assert torch.equal(out, DOC_TOKENS)


@pytest.mark.parametrize("call, match", [
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED, t(DOC_SORTED, I64)), "sorted_indices dtype"),
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED, t(DOC_SORTED, I32), torch.ones(8)), "probs should be 2"),
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED, t(DOC_SORTED, I32), torch.ones(3, 2)), "tokens_num"),
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED, t([[0, 1]], I32)), "sorted_indices should be 1"),
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED[0], t(DOC_SORTED, I32)), "permuted_tokens should be 2"),
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED, t([0, -1], I32)), ">= 0"),
    (lambda: npu_moe_token_unpermute(DOC_PERMUTED.to(I32), t(DOC_SORTED, I32)), "permuted_tokens dtype"),
])
def test_unpermute_rejects(call, match):
    raises_code(PARAM_INVALID, call, match)


# ============================================================================ npu_grouped_matmul

def test_gmm_no_grouping_each_x_times_its_weight_with_bias():
    x0, w0 = t([[1.0, 2.0], [3.0, 4.0]]), t([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    x1, w1 = t([[[1.0, 1.0, 1.0]]]), t([[2.0], [3.0], [4.0]])
    out = npu_grouped_matmul([x0, x1], [w0, w1], bias=[t([0.5, 0.0, 0.0]), t([1.0])], group_type=-1)
    assert [o.shape for o in out] == [(2, 3), (1, 1, 1)]
    assert out[0].tolist() == [[1.5, 2.0, 3.0], [3.5, 4.0, 7.0]] and out[1].tolist() == [[[10.0]]]


@pytest.mark.parametrize("group_list_type, group_list", [(0, [1, 1, 3]), (1, [1, 0, 2])])
def test_gmm_m_groups_single_weight_and_rows_past_the_groups(group_list_type, group_list):
    """Rows 0 | - | 1, 2 of x go to experts 0, 1, 2; row 3 is past the groups: the kernel leaves
    it unwritten, the emulator writes 0."""
    x = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]], BF16)
    w = torch.stack([t([[1.0], [2.0]]), t([[5.0], [5.0]]), t([[3.0], [4.0]])]).to(BF16)
    out = npu_grouped_matmul([x], [w], bias=[t([[0.0], [0.0], [0.5]])], group_list=t(group_list, I64),
                             group_list_type=group_list_type, split_item=3, group_type=0)
    assert len(out) == 1 and out[0].dtype == BF16 and out[0].tolist() == [[1.0], [4.5], [7.5], [0.0]]


def test_gmm_sparse_group_list_takes_rows_in_turn():
    """group_list_type 2: rows [expert, count] (init_routing_v2's key-value table): rows 0-1 go to
    expert 2, row 2 to expert 0, [0, 0] adds nothing, row 3 is past the groups (0)."""
    x = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]], BF16)
    w = torch.stack([t([[1.0], [2.0]]), t([[5.0], [5.0]]), t([[3.0], [4.0]])]).to(BF16)
    out = npu_grouped_matmul([x], [w], group_list=t([[2, 2], [0, 1], [0, 0]], I64), group_list_type=2,
                             split_item=2, group_type=0)
    assert out[0].tolist() == [[3.0], [4.0], [3.0], [0.0]]
    for bad in ([[3, 1], [0, 1]], [[0, 5], [1, 0]]):                       # expert out of range; too many rows
        raises_code(PARAM_INVALID, lambda: npu_grouped_matmul([x], [w], group_list=t(bad, I64), group_list_type=2,
                                                              split_item=2, group_type=0))


def test_gmm_bf16_accumulates_in_fp32_with_one_rounding():
    x = t([[1.0, 2.0 ** -8, 2.0 ** -8, 2.0 ** -8]], BF16)
    out = npu_grouped_matmul([x], [torch.ones(1, 4, 1, dtype=BF16)], group_list=t([1], I64), split_item=2,
                             group_type=0)
    assert out[0].item() == 1.015625            # fp32 1.01171875 rounded once (bf16 steps would give 1.0)


def test_gmm_weight_list_and_several_x():
    x = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], F16)
    w0, w1 = t([[1.0], [1.0]], F16), t([[1.0], [-1.0]], F16)
    out = npu_grouped_matmul([x], [w0, w1], group_list=t([1, 2], I64), group_list_type=1, split_item=2,
                             group_type=0)
    assert out[0].tolist() == [[3.0], [-1.0], [-1.0]]
    out = npu_grouped_matmul([x[:1], x[1:]], [w0, w1], split_item=3, group_type=0)
    assert out[0].tolist() == [[3.0], [-1.0], [-1.0]]


def test_gmm_int8_int32_output_and_int32_bias():
    """w8a8's first matmul: int32 accumulation, int32 bias added in int32, no scale."""
    x = t([[1, 2], [3, 4], [5, 6]], I8)
    w = torch.stack([t([[1, 0], [0, 1]], I8), t([[1, 1], [1, -1]], I8)])
    out = npu_grouped_matmul([x], [w], bias=[t([[0, 0], [100, 0]], I32)], group_list=t([1, 2], I64),
                             group_list_type=1, split_item=3, group_type=0, output_dtype=3)
    assert out[0].dtype == I32 and out[0].tolist() == [[1, 2], [107, -1], [111, -1]]


def test_gmm_int8_per_token_and_per_channel_dequant():
    """y = fp32(int32 acc) * scale[n] * per_token_scale[m], rounded once (bf16 with bf16 scale,
    fp16 with fp32 scale)."""
    x = t([[1, 2], [3, 4]], I8)
    w = torch.stack([t([[1, 0], [0, 1]], I8), t([[2, 0], [0, 2]], I8)])
    out = npu_grouped_matmul([x], [w], scale=[t([[0.5, 2.0], [1.0, 0.25]], BF16)], per_token_scale=[t([2.0, 0.5])],
                             group_list=t([1, 2], I64), split_item=2, group_type=0, output_dtype=15)
    assert out[0].dtype == BF16 and out[0].tolist() == [[1.0, 8.0], [3.0, 1.0]]    # [6, 8] * [1, .25] * .5
    out = npu_grouped_matmul([x], [w[0]], scale=[t([0.5, 2.0])], group_type=-1, output_dtype=5)
    assert out[0].dtype == F16 and out[0].tolist() == [[0.5, 4.0], [1.5, 8.0]]


def test_gmm_list_overload():
    """group_list as int cumulative offsets: one x, G weights -> G outputs (split_item 0/1) or one."""
    x = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], BF16)
    w0, w1 = t([[1.0], [0.0]], BF16), t([[0.0], [1.0]], BF16)
    out = npu_grouped_matmul_list([x], [w0, w1], group_list=[1, 3], split_item=0)
    assert [o.tolist() for o in out] == [[[1.0]], [[4.0], [6.0]]]
    out = npu_grouped_matmul_list([x], [w0, w1], group_list=[1, 3], split_item=2, output_dtype=BF16)
    assert out[0].tolist() == [[1.0], [4.0], [6.0]]
    out = npu_grouped_matmul_list([x], [w0], group_list=[3], split_item=0)
    assert [o.tolist() for o in out] == [[[1.0], [3.0], [5.0]]]
    with pytest.raises(AclnnError, match="x must have one tensor"):      # torch_npu's check_dims
        npu_grouped_matmul_list([x[:1], x[1:]], [w0, w1], group_list=[1, 3], split_item=0)


def _gmm_x_w():
    return t([[1.0, 2.0], [3.0, 4.0]], BF16), torch.ones(2, 2, 3, dtype=BF16)


@pytest.mark.parametrize("kwargs, code, match", [
    ({}, PARAM_INVALID, "group_type"),
    ({"group_type": 1}, PARAM_INVALID, "-1, 0 or 2"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 0}, PARAM_INVALID, "split_item"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 4}, PARAM_INVALID, "0/1/2/3"),
    ({"group_type": 0, "split_item": 2}, PARAM_INVALID, "required"),
    ({"group_type": 0, "group_list": t([1, 2, 2], I64), "split_item": 2}, PARAM_INVALID, "group count"),
    ({"group_type": 0, "group_list": t([1, 2], I32), "split_item": 2}, PARAM_INVALID, "int64"),
    ({"group_type": 0, "group_list": t([2, 1], I64), "split_item": 2}, PARAM_INVALID, "non-decreasing"),
    ({"group_type": 0, "group_list": t([2, 1], I64), "group_list_type": 1, "split_item": 2}, PARAM_INVALID,
     "more than x's"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "group_list_type": 3, "split_item": 2}, PARAM_INVALID,
     "group_list_type"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "output_dtype": 5}, PARAM_INVALID,
     "output_dtype"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "scale": [torch.ones(2, 3)]}, PARAM_INVALID,
     "nonquant"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "bias": [torch.ones(2, 3, dtype=BF16)]},
     PARAM_INVALID, "bias dtype"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "bias": [torch.ones(3)]}, PARAM_INVALID,
     "bias shape"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "activation_input": [torch.ones(1)]},
     PARAM_INVALID, "activation_input"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "act_type": 1}, PARAM_INVALID, "activation"),
    ({"group_type": 0, "group_list": t([1, 2], I64), "split_item": 2, "tuning_config": [9]}, PARAM_INVALID,
     "tuning_config"),
])
def test_gmm_rejects(kwargs, code, match):
    x, w = _gmm_x_w()
    raises_code(code, lambda: npu_grouped_matmul([x], [w], **kwargs), match)


@pytest.mark.parametrize("call, code, match", [
    (lambda: npu_grouped_matmul([torch.ones(2, 2)], [torch.ones(2, 2)], group_type=-1, split_item=2), PARAM_INVALID,
     "can not be -1"),
    (lambda: npu_grouped_matmul([torch.ones(2, 2)], [torch.ones(1, 2, 2)], group_type=-1, group_list=t([2], I64)),
     PARAM_INVALID, "None when group_type is -1"),
    (lambda: npu_grouped_matmul([torch.ones(2, 3)], [torch.ones(2, 2)], group_type=-1), PARAM_INVALID, "k dim"),
    (lambda: npu_grouped_matmul([torch.ones(1, 2)] * 129, [torch.ones(2, 2)] * 129, group_type=-1), PARAM_INVALID,
     "128"),
    (lambda: npu_grouped_matmul([torch.ones(2, 2)], [torch.ones(2, 2, dtype=BF16)], group_type=-1), PARAM_INVALID,
     "no matching"),
    (lambda: npu_grouped_matmul([torch.ones(2, 2, dtype=I8)], [torch.ones(2, 2, dtype=I8)], group_type=-1,
                                output_dtype=15), PARAM_INVALID, "scale must not be"),
    (lambda: npu_grouped_matmul([torch.ones(2, 2, dtype=I8)], [torch.ones(2, 2, dtype=I8)], group_type=-1,
                                scale=[torch.ones(2)], per_token_scale=[torch.ones(2)], output_dtype=15),
     PARAM_INVALID, "scale bfloat16 with output bfloat16"),
    (lambda: npu_grouped_matmul([torch.ones(2, 2, dtype=I8)], [torch.ones(2, 2, dtype=I8)], group_type=-1,
                                scale=[torch.ones(2)], per_token_scale=[torch.ones(3)], output_dtype=5),
     PARAM_INVALID, "per_token_scale must be"),
    (lambda: npu_grouped_matmul_list([torch.ones(3, 2, dtype=BF16)], [torch.ones(2, 1, dtype=BF16)] * 2,
                                     group_list=[1, 2], split_item=2), PARAM_INVALID, "last value"),
    (lambda: npu_grouped_matmul_list([torch.ones(3, 2, dtype=BF16)], [torch.ones(2, 1, dtype=BF16)] * 2,
                                     split_item=2), PARAM_NULLPTR, "group_list required"),
    (lambda: npu_grouped_matmul_list([torch.ones(3, 2)], [torch.ones(2, 1)] * 2, group_list=[1, 3], split_item=2),
     PARAM_INVALID, "float32"),
    (lambda: npu_grouped_matmul_list([torch.ones(3, 2, dtype=BF16)], [torch.ones(2, 2, 1, dtype=BF16)],
                                     group_list=[1, 3], split_item=2), PARAM_INVALID, "2-D weights"),
])
def test_gmm_rejects_more(call, code, match):
    raises_code(code, call, match)


def test_gmm_modes_not_emulated():
    x, w = _gmm_x_w()
    with pytest.raises(NotImplementedError, match="x_dtype=290"):
        npu_grouped_matmul([x], [w], group_list=t([1, 2], I64), split_item=2, group_type=0, x_dtype=290)


def test_gmm_k_axis_groups():
    """group_type 2 (K_SPLIT, as Huawei's test_npu_grouped_matmul_6 calls it): x (M, K) split along K by the
    group_list; group g multiplies its columns by its rows of the one weight -> (G, M, N)."""
    x = t([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]], F16)
    w = t([[1.0], [10.0], [100.0], [1000.0]], F16)
    y = npu_grouped_matmul([x], [w], group_list=t([1, 4], I64), split_item=3, group_type=2)[0]
    # group 0: column 0 x row 0 = [1, 0.5]; group 1: columns 1-3 x rows 1-3 = [4320, 555]
    assert y.shape == (2, 2, 1) and y[..., 0].tolist() == [[1.0, 0.5], [4320.0, 555.0]]
    counts = npu_grouped_matmul([x], [w], group_list=t([1, 3], I64), split_item=3, group_type=2, group_list_type=1)
    assert torch.equal(counts[0], y)
    raises_code(PARAM_INVALID, lambda: npu_grouped_matmul([x], [w], group_list=t([1, 5], I64), split_item=3,
                                                          group_type=2), "into non-negative groups")


def test_gmm_int8_output_takes_a_packed_int64_scale():
    """int8 x and weight, output_dtype None: per-channel requant with an int64 scale holding the fp32
    scale's bits in its low word (Huawei's deq_scale_generate): int8(rint(acc * scale)), saturated."""
    x8, w8 = torch.full((2, 3), 2, dtype=I8), torch.full((3, 2), 5, dtype=I8)       # acc 30
    half = struct.unpack("<I", struct.pack("<f", 0.5))[0] | 0x400000000000
    scale = torch.tensor([half, struct.unpack("<I", struct.pack("<f", 8.0))[0]], dtype=I64)
    y = npu_grouped_matmul([x8], [w8], scale=[scale], group_type=-1)[0]
    assert y.dtype == I8 and y.tolist() == [[15, 127]] * 2                          # 30 * 0.5, 30 * 8 -> 127
    raises_code(PARAM_INVALID, lambda: npu_grouped_matmul([x8], [w8], scale=[torch.ones(2)], group_type=-1),
                "int64 / uint64 scale")
    with pytest.raises(NotImplementedError, match="antiquant"):
        npu_grouped_matmul([torch.ones(2, 2, dtype=BF16)], [torch.ones(2, 2, dtype=I8)],
                           antiquant_scale=[torch.ones(2, dtype=BF16)], group_type=-1)


# ============================================================================ fakes against kernels, the wheel's meta

def _cases() -> list[tuple[str, tuple, dict]]:
    """(KERNELS key, args, kwargs) of valid calls of every op."""
    x8 = torch.randint(-5, 5, (6, 8), dtype=I8)
    w8 = torch.randint(-5, 5, (3, 8, 4), dtype=I8)
    xb, wb = torch.randn(6, 8).to(BF16), torch.randn(3, 8, 4).to(BF16)
    counts = t([2, 0, 3], I64)
    return [
        ("npu_grouped_matmul", ([xb], [wb]), {"group_list": counts, "group_list_type": 1, "split_item": 3,
                                              "group_type": 0}),
        ("npu_grouped_matmul", ([xb], [wb]), {"group_list": counts.cumsum(0), "split_item": 2, "group_type": 0,
                                              "bias": [torch.randn(3, 4)]}),
        ("npu_grouped_matmul", ([xb], list(wb)), {"group_list": counts, "group_list_type": 1, "split_item": 2,
                                                  "group_type": 0}),
        ("npu_grouped_matmul", ([xb[:2], xb[2:]], list(wb[:2])), {"split_item": 2, "group_type": 0}),
        ("npu_grouped_matmul", ([xb, torch.randn(2, 3, 4).to(BF16)], [wb[0], torch.randn(4, 5).to(BF16)]),
         {"group_type": -1}),
        ("npu_grouped_matmul", ([x8], [w8]), {"group_list": counts, "group_list_type": 1, "split_item": 3,
                                              "group_type": 0, "output_dtype": 3}),
        ("npu_grouped_matmul", ([x8], [w8]), {"group_list": counts, "group_list_type": 1, "split_item": 3,
                                              "group_type": 0, "output_dtype": 15, "scale": [torch.rand(3, 4).to(BF16)],
                                              "per_token_scale": [torch.rand(6)]}),
        ("npu_grouped_matmul", ([x8], [w8]), {"group_list": counts, "group_list_type": 1, "split_item": 2,
                                              "group_type": 0, "output_dtype": 5, "scale": [torch.rand(3, 4)]}),
        ("npu_grouped_matmul", ([xb], [wb]), {"group_list": t([[2, 3], [0, 2], [0, 0]], I64), "group_list_type": 2,
                                              "split_item": 2, "group_type": 0}),
        ("npu_grouped_matmul.List", ([xb], list(wb[:2])), {"group_list": [2, 6], "split_item": 2}),
        ("npu_grouped_matmul.List", ([xb], list(wb[:2])), {"group_list": [2, 6], "split_item": 1}),
        ("npu_grouped_matmul.List", ([xb], [wb[0]]), {"split_item": 0, "group_type": -1}),
        ("npu_swiglu", (torch.randn(3, 8).to(BF16),), {}),
        ("npu_swiglu", (torch.randn(4, 3, 5),), {"dim": 0}),
        ("npu_dynamic_quant", (torch.randn(2, 3, 8).to(F16),), {}),
        ("npu_dynamic_quant", (torch.randn(4, 8).to(BF16),), {"smooth_scales": torch.rand(2, 8).to(BF16),
                                                              "group_index": t([1, 4], I32)}),
        ("npu_dequant_swiglu_quant", (torch.randint(-99, 99, (5, 128), dtype=I32),),
         {"weight_scale": torch.rand(2, 128), "activation_scale": torch.rand(5), "group_index": t([2, 2], I64),
          "activate_left": True, "quant_mode": 1}),
        ("npu_dequant_swiglu_quant", (torch.randn(3, 10).to(BF16),), {"activate_left": True, "quant_mode": 1}),
        ("npu_moe_token_permute", (torch.randn(4, 3), t(DOC_INDICES, I64)), {"num_out_tokens": -2}),
        ("npu_moe_token_permute", (torch.randn(4, 3).to(BF16), t([3, 1, 0, 1], I32)), {}),
        ("npu_moe_token_unpermute", (torch.randn(8, 3).to(BF16), t(DOC_SORTED, I32)), {"probs": torch.rand(4, 2)}),
        ("npu_moe_token_unpermute", (torch.randn(5, 3), t([4, 0, 1, 3, 2], I32)), {}),
    ]


def _meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [_meta(v) for v in value]
    return value


def _meta_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_meta(a) for a in args), {k: _meta(v) for k, v in kwargs.items()}


def _shapes(result) -> list[tuple[tuple[int, ...], torch.dtype]]:
    items = result if isinstance(result, (list, tuple)) else [result]
    return [(tuple(r.shape), r.dtype) for r in items]


def test_kernels_cover_the_schema_names():
    assert sorted(compute.KERNELS) == sorted(["npu_grouped_matmul", "npu_grouped_matmul.List", "npu_swiglu",
                                              "npu_dequant_swiglu_quant", "npu_moe_token_permute",
                                              "npu_moe_token_unpermute", "npu_dynamic_quant"])


@pytest.mark.parametrize("case", range(len(_cases())))
def test_fake_on_meta_tensors_agrees_with_the_kernel(case):
    torch.manual_seed(case)
    name, args, kwargs = _cases()[case]
    kernel, fake = compute.KERNELS[name]
    real = kernel(*args, **kwargs)
    m_args, m_kwargs = _meta_call(args, kwargs)
    faked = fake(*m_args, **m_kwargs)
    assert _shapes(faked) == _shapes(real)
    assert all(r.device.type == "meta" for r in (faked if isinstance(faked, (list, tuple)) else [faked]))


@pytest.mark.parametrize("case", range(len(_cases())))
def test_kernel_outputs_are_fresh_tensors(case):
    """No output is an input or a view of one (the schemas declare no aliasing)."""
    torch.manual_seed(case)
    name, args, kwargs = _cases()[case]
    real = compute.KERNELS[name][0](*args, **kwargs)
    flat = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, list) else [a])]
    inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor) and a.numel()}
    outputs = real if isinstance(real, (list, tuple)) else [real]
    assert not any(o.numel() and o.untyped_storage().data_ptr() in inputs for o in outputs)


@pytest.mark.parametrize("name, args, kwargs, code", [
    ("npu_grouped_matmul", ([torch.ones(2, 2)], [torch.ones(2, 2, 3)]), {}, PARAM_INVALID),
    ("npu_grouped_matmul", ([torch.ones(2, 2)], [torch.ones(2, 2, 3)]),
     {"group_type": 0, "group_list": t([1, 2], I64), "split_item": 0}, PARAM_INVALID),
    ("npu_moe_token_permute", (DOC_TOKENS, t(DOC_INDICES, I32)), {"padded_mode": True}, TILING_ERROR),
    ("npu_dequant_swiglu_quant", (torch.zeros(2, 8, dtype=I32),),
     {"weight_scale": torch.ones(8), "group_index": t([2], I64), "quant_mode": 1}, PARAM_INVALID),
])
def test_fakes_raise_what_the_kernels_raise_without_data(name, args, kwargs, code):
    kernel, fake = compute.KERNELS[name]
    raises_code(code, lambda: kernel(*args, **kwargs))
    m_args, m_kwargs = _meta_call(args, kwargs)
    raises_code(code, lambda: fake(*m_args, **m_kwargs))


WHEEL = npu_wheel.find_wheel()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason=f"torch_npu {npu_wheel.VERSION} wheel not found: "
                                                       f"{npu_wheel.DOWNLOAD} (or set MC2_EMU_TORCH_NPU_WHEEL)")
WHEEL_META = {"npu_grouped_matmul": "npu_grouped_matmul_meta", "npu_grouped_matmul.List": "npu_grouped_matmul_meta",
              "npu_swiglu": "npu_swiglu_meta", "npu_dequant_swiglu_quant": "npu_dequant_swiglu_quant_meta",
              "npu_moe_token_permute": "npu_moe_token_permute_meta",
              "npu_moe_token_unpermute": "npu_moe_token_unpermute_meta", "npu_dynamic_quant": "npu_dynamic_quant"}
# The .List overload's split_item 0 with a group_list: torch_npu's eager kernel gives one output per group
# (what the fake gives), its meta function one per x tensor; left out of the comparison.
META_DIVERGES = {("npu_grouped_matmul.List", 0)}


@pytest.fixture(scope="module")
def wheel_meta():
    return npu_wheel.named_meta_functions(WHEEL, sorted(set(WHEEL_META.values())))


@needs_wheel
def test_signatures_equal_the_schema():
    """The dispatcher calls a Python kernel with the schema's positional arguments by position and
    its keyword-only ones by name: kernels mirror the schema (fakes mirror it or bind to the kernel's)."""
    for name, (kernel, _) in compute.KERNELS.items():
        want = npu_wheel.schema(WHEEL, [name])[name]
        got = list(inspect.signature(kernel).parameters.values())
        assert [(p.name, p.kind == p.KEYWORD_ONLY) for p in got] == [(p.name, p.keyword_only) for p in want], name
        assert [npu_wheel.REQUIRED if p.default is p.empty else p.default for p in got] == [p.default for p in want]


def _meta_comparable(case: int) -> bool:
    name, _, kwargs = _cases()[case]
    return not ((name, kwargs.get("split_item")) in META_DIVERGES and kwargs.get("group_list") is not None)


@needs_wheel
@pytest.mark.parametrize("case", [c for c in range(len(_cases())) if _meta_comparable(c)])
def test_fake_agrees_with_the_wheels_meta_function(wheel_meta, case):
    torch.manual_seed(case)
    name, args, kwargs = _cases()[case]
    m_args, m_kwargs = _meta_call(args, kwargs)
    want = wheel_meta[WHEEL_META[name]](*m_args, **m_kwargs)
    assert _shapes(compute.KERNELS[name][1](*m_args, **m_kwargs)) == _shapes(want)


@pytest.mark.parametrize("case", range(len(_cases())))
def test_opcheck_through_the_registered_op(case):
    """torch.library.opcheck of torch.ops.npu.<op>: no undeclared mutation or aliasing, the fake
    kernel against the kernel, AOT dispatch with dynamic shapes."""
    torch.manual_seed(case)
    name, args, kwargs = _cases()[case]
    base, _, overload = name.partition(".")
    op = getattr(getattr(torch.ops.npu, base), overload or "default")
    result = torch.library.opcheck(op, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result
