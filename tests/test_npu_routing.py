"""torch_npu's MoE routing operators on the CPU (emu/npu/routing.py): hand-worked cases with
their values written out, properties against simple Python-loop references on random inputs,
the init_routing -> experts -> finalize_routing roundtrip, argument errors (the A2 / A3 kernels'
codes), out-of-contract input (a ContractWarning once per call site, EMU_STRICT=1 an error), and
(when the torch_npu 2.14.0 wheel is at hand) the signatures and output shapes / dtypes of the
wheel's schema and meta functions.

init_routing_v2 follows the A2 / A3 kernel (hicann/ops-transformer moe/moe_init_routing_v3 at
c29bc10) and Huawei's golden (Ascend/op-plugin test/test_custom_ops/test_npu_moe_init_routing_v2.py
at 517f2e7d): the tiling (op_host/moe_init_routing_v3_tiling.cpp:233-352) takes dropless calls
only, active_num -1 or N * K, expert counts or key-value with expert_tokens_num_flag True and
quant_mode -1 / 1; the scatter index is the kernel's whole sort (op_kernel/moe_v3_sort_one_core.h:
experts below the range sort last, the rest by expert).  Earlier versions of these tests encoded
the API page's wider reading (drop/pad, static quant, cumsum counts, active_num < N * K, a scatter
index of -1 past the routed pairs)."""
from __future__ import annotations

import inspect
import math
import re
import warnings

import npu_wheel
import pytest
import torch

from emu.core.errors import PARAM_INVALID, TILING_ERROR, AclnnError, ContractWarning
from emu.npu.routing import (
    npu_moe_compute_expert_tokens,
    npu_moe_finalize_routing,
    npu_moe_gating_top_k_softmax,
    npu_moe_init_routing,
    npu_moe_init_routing_v2,
    npu_moe_re_routing,
)

pytestmark = pytest.mark.timeout(60)
I32 = torch.int32


def t32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=I32)


# ============================================================================ hand-worked cases

# 3 tokens, 4 experts, k 2.  x = log(p) so softmax(x) = p exactly (each p sums to 1):
#   token 0: p = [.1, .2, .3, .4]      -> top 2: expert 3 (.4), expert 2 (.3)
#   token 1: p = [.25, .25, .25, .25]  -> all tied: lower ids first -> experts 0, 1
#   token 2: p = [.4, .1, .4, .1]      -> tie of 0 and 2 at .4 -> experts 0, 2
# row_idx[n, j] = j * N + n = [[0, 3], [1, 4], [2, 5]].
GATE_X = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.4, 0.1, 0.4, 0.1]]).log()


def test_gating_hand_case():
    y, expert, row = npu_moe_gating_top_k_softmax(GATE_X, None, k=2)
    torch.testing.assert_close(y, torch.tensor([[0.4, 0.3], [0.25, 0.25], [0.4, 0.4]]))
    assert expert.dtype == row.dtype == I32 and y.dtype == torch.float32
    assert expert.tolist() == [[3, 2], [0, 1], [0, 2]]
    assert row.tolist() == [[0, 3], [1, 4], [2, 5]]


def test_gating_finished_rows_get_expert_id_E():
    # token 1 finished: its experts become E = 4; its y (the softmax top 2) are unchanged
    y, expert, _ = npu_moe_gating_top_k_softmax(GATE_X, torch.tensor([False, True, False]), k=2)
    assert expert.tolist() == [[3, 2], [4, 4], [0, 2]]
    torch.testing.assert_close(y[1], torch.tensor([0.25, 0.25]))


def test_gating_3d_numbers_rows_flat_and_keeps_dtype():
    # (B 2, S 2, E 4), k 2: the 4 rows flattened; row_idx = j * 4 + r
    x = GATE_X[[0, 1, 2, 0]].reshape(2, 2, 4).half()
    y, expert, row = npu_moe_gating_top_k_softmax(x, torch.zeros(2, 2, dtype=torch.bool), k=2)
    assert y.shape == expert.shape == row.shape == (2, 2, 2) and y.dtype == torch.float16
    assert row.tolist() == [[[0, 4], [1, 5]], [[2, 6], [3, 7]]]
    assert expert.tolist() == [[[3, 2], [0, 1]], [[0, 2], [3, 2]]]


# The calls the A2 / A3 tiling of init_routing_v2 takes need expert counts (type 1 or 2) and the flag.
COUNTS = {"expert_tokens_num_type": 1, "expert_tokens_num_flag": True}

# The doc's example: 3 tokens (H 4), k 2, row_idx from gating, experts [[1, 2], [0, 1], [0, 2]].
X3 = torch.tensor([[0.1] * 4, [0.2] * 4, [0.3] * 4])
ROW3 = t32([[0, 3], [1, 4], [2, 5]])


def test_init_routing_hand_case():
    # flattened row-major, pair p = n * 2 + k has expert [1, 2, 0, 1, 0, 2] and id row_idx = [0, 3, 1, 4, 2, 5].
    # stable sort by expert: e0: p2, p4; e1: p0, p3; e2: p1, p5 -> ids [1, 2, 0, 4, 3, 5]
    # expanded_x[i] = x[id_i % 3] -> tokens [1, 2, 0, 1, 0, 2]; expanded_row_idx[id_i] = i
    ex, row, expert = npu_moe_init_routing(X3, ROW3, t32([[1, 2], [0, 1], [0, 2]]), 3)
    assert ex[:, 0].tolist() == pytest.approx([0.2, 0.3, 0.1, 0.2, 0.1, 0.3])
    assert row.tolist() == [2, 0, 1, 4, 3, 5]
    assert expert.tolist() == [0, 0, 1, 1, 2, 2] and row.dtype == expert.dtype == I32
    # active_num 1: min(1, 3) * 2 = 2 rows, the first two of the order
    ex1, row1, _ = npu_moe_init_routing(X3, ROW3, t32([[1, 2], [0, 1], [0, 2]]), 1)
    assert ex1[:, 0].tolist() == pytest.approx([0.2, 0.3]) and row1.tolist() == [2, 0, 1, 4, 3, 5]


def test_init_routing_ties_keep_token_then_k_order():
    # every pair on expert 0: the sort keeps the row-major order p = 0..5, ids [0, 3, 1, 4, 2, 5]
    # -> tokens [0, 0, 1, 1, 2, 2]; expanded_row_idx[id_i] = i -> [0, 2, 4, 1, 3, 5]
    ex, row, expert = npu_moe_init_routing(X3, ROW3, t32([[0, 0]] * 3), 3)
    assert ex[:, 0].tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    assert row.tolist() == [0, 2, 4, 1, 3, 5] and expert.tolist() == [0] * 6


# v2: experts [[2, 0], [1, 2], [0, 1]], pairs p = n * 2 + k: experts [2, 0, 1, 2, 0, 1].
# Sorted (expert, p): e0: p1, p4; e1: p2, p5; e2: p0, p3 -> order [1, 4, 2, 5, 0, 3],
# tokens p // 2 = [0, 2, 1, 2, 0, 1].
# scatter index = order; gather index [p] -> i = [4, 0, 2, 5, 1, 3].
X3B = torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]])
E3B = t32([[2, 0], [1, 2], [0, 1]])


def test_init_routing_v2_hand_case_gather_and_scatter():
    ex, gather, count, scale = npu_moe_init_routing_v2(X3B, E3B, expert_num=3, expert_tokens_num_flag=True,
                                                       expert_tokens_num_type=1)
    assert ex[:, 0].tolist() == [1.0, 3.0, 2.0, 3.0, 1.0, 2.0]
    assert gather.tolist() == [4, 0, 2, 5, 1, 3] and gather.dtype == I32
    assert count.tolist() == [2, 2, 2] and count.dtype == torch.int64
    assert scale.shape == (6,) and scale.dtype == torch.float32
    # scatter: the sort order itself.  (cumsum counts, expert_tokens_num_type 0, are refused by the A2 / A3
    # tiling: moe_init_routing_v3_tiling.cpp:268-271 "expert_tokens_num_type currently not support 0")
    _, scatter, count, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=3, row_idx_type=1,
                                                   expert_tokens_num_flag=True, expert_tokens_num_type=1)
    assert scatter.tolist() == [1, 4, 2, 5, 0, 3] and count.tolist() == [2, 2, 2]


def test_init_routing_v2_active_expert_range_and_active_num():
    # range [1, 3): pairs p1, p4 (expert 0) are outside.  Sorted: e1: p2, p5; e2: p0, p3 -> [2, 5, 0, 3],
    # tokens [1, 2, 0, 1], then 2 zero rows.  gather: p2 -> 0, p5 -> 1, p0 -> 2, p3 -> 3, others -1.
    ex, gather, kv, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=4, active_expert_range=[1, 3],
                                                expert_tokens_num_flag=True, expert_tokens_num_type=2)
    assert ex[:, 0].tolist() == [2.0, 3.0, 1.0, 2.0, 0.0, 0.0]
    assert gather.tolist() == [2, -1, 0, 3, -1, 1]
    assert kv.tolist() == [[1, 2], [2, 2], [0, 0], [0, 0]]            # (expert_num, 2): [expert, count], zeros
    # scatter: the kernel's whole sort, experts below the range last (p1, p4 of expert 0, in order); Huawei's
    # golden compares all N * K entries (earlier: -1 past the 4 routed pairs, the API page's reading)
    _, scatter, count, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=4, active_expert_range=[1, 3],
                                                   row_idx_type=1, expert_tokens_num_flag=True,
                                                   expert_tokens_num_type=1, active_num=6)
    assert scatter.tolist() == [2, 5, 0, 3, 1, 4] and count.tolist() == [2, 2]
    # experts past the range sort after it by expert, before those below it: experts [3, 0, 1, 3, 0, 1]
    # with range [1, 2): p2, p5 (e1), then p0, p3 (e3), then p1, p4 (e0)
    _, scatter, _, _ = npu_moe_init_routing_v2(X3B, t32([[3, 0], [1, 3], [0, 1]]), expert_num=4,
                                               active_expert_range=[1, 2], row_idx_type=1,
                                               expert_tokens_num_flag=True, expert_tokens_num_type=1)
    assert scatter.tolist() == [2, 5, 0, 3, 1, 4]
    # active_num other than -1 and N * K, and expert_tokens_num_flag False: the A2 / A3 tiling refuses them
    # (moe_init_routing_v3_tiling.cpp:324-327 and :273-275)
    for bad, message in (({"active_num": 3}, "active_num currently should equal to 6(bs*k)"),
                         ({"expert_tokens_num_flag": False}, "expert_tokens_num_flag currently support True")):
        kwargs = {"expert_num": 4, "expert_tokens_num_type": 1, "expert_tokens_num_flag": True, **bad}
        with pytest.raises(AclnnError, match=re.escape(message)) as e:
            npu_moe_init_routing_v2(X3B, E3B, **kwargs)
        assert e.value.code == TILING_ERROR


def test_init_routing_v2_dynamic_quant_hand_case():
    # 2 tokens, k 1, experts [[1], [0]] -> rows: token 1 (expert 0), token 0 (expert 1).
    # token 1 is all zero -> y 0, scale 0.  token 0: max|x| = 254 -> scale 2,
    # y = round([254, -127, 63.5, 0] / 2) = round([127, -63.5, 31.75, 0]) = [127, -64, 32, 0] (half to even)
    x = torch.tensor([[254.0, -127.0, 63.5, 0.0], [0.0] * 4])
    ex, _, _, scale = npu_moe_init_routing_v2(x, t32([[1], [0]]), expert_num=2, quant_mode=1, **COUNTS)
    assert ex.dtype == torch.int8 and ex.tolist() == [[0] * 4, [127, -64, 32, 0]]
    assert scale.tolist() == [0.0, 2.0]
    # smooth scale per expert (E 2, H 4); token 0 (expert 1) * [0.5, 2, 1, 1] = [127, -254, 63.5, 0]
    # -> scale 2, y = round([63.5, -127, 31.75, 0]) = [64, -127, 32, 0]
    smooth = torch.tensor([[1.0] * 4, [0.5, 2.0, 1.0, 1.0]])
    ex, _, _, scale = npu_moe_init_routing_v2(x, t32([[1], [0]]), scale=smooth, expert_num=2, quant_mode=1,
                                              **COUNTS)
    assert ex.tolist() == [[0] * 4, [64, -127, 32, 0]] and scale.tolist() == [0.0, 2.0]


def test_init_routing_v2_static_quant_and_drop_pad_are_refused_on_a2_a3():
    """The API page lists static quant (quant_mode 0) and drop/pad (drop_pad_mode 1); the A2 / A3 tiling
    refuses both (moe_init_routing_v3_tiling.cpp:263-265 "drop_pad_mode currently support 0", :293-295
    "quant_mode currently support -1 or 1"; the 2.14 API page itself says "当前仅支持" 0 and -1 / 1, and
    Huawei's static-quant test is skipped).  Earlier versions emulated both from the API page."""
    for kwargs, message in (({"quant_mode": 0, "scale": torch.tensor([2.0]), "offset": torch.tensor([0.5])},
                             "quant_mode currently support -1 or 1"),
                            ({"drop_pad_mode": 1, "expert_capacity": 2}, "drop_pad_mode currently support 0")):
        with pytest.raises(AclnnError, match=re.escape(message)) as e:
            npu_moe_init_routing_v2(X3B, E3B, expert_num=3, **COUNTS, **kwargs)
        assert e.value.code == TILING_ERROR


def test_init_routing_v2_empty_x_returns_before_any_scale_check():
    """torch_npu's adapter returns empty outputs and zero counts when x has no rows, before aclnn
    (MoeInitRoutingV2KernelNpuOpApi.cpp "return when using empty tensor"): Huawei's empty-tensor test
    passes a (0,) scale with quant_mode 1, which the aclnn check (2-D scale) would refuse."""
    x, ids = torch.zeros(0, 8, dtype=torch.bfloat16), torch.zeros(0, 12, dtype=I32)
    ex, idx, counts, scale = npu_moe_init_routing_v2(x, ids, scale=torch.zeros(0), expert_num=32, quant_mode=1,
                                                     active_expert_range=[0, 16], expert_tokens_num_type=2,
                                                     expert_tokens_num_flag=True, row_idx_type=1)
    assert ex.shape == (0, 8) and ex.dtype == torch.int8 and idx.numel() == 0 and scale.numel() == 0
    assert counts.shape == (32, 2) and not counts.any()


# finalize: N 2, K 2, H 2.  rows r0..r3 = 1, 2, 3, 4; token 0 -> rows 3, 1; token 1 -> rows 0, 2.
# scales [[.5, 2], [1, -1]], experts [[0, 2], [1, 1]], bias [10, 20, 30], skip1 [100, 200], skip2 1.
# token 0: 101 + .5 * (4 + 10) + 2 * (2 + 30) = 101 + 7 + 64 = 172
# token 1: 201 + 1 * (1 + 20) - 1 * (3 + 20) = 201 + 21 - 23 = 199
ROWS = torch.tensor([[1.0] * 2, [2.0] * 2, [3.0] * 2, [4.0] * 2])
FIN = {"skip1": torch.tensor([[100.0] * 2, [200.0] * 2]), "skip2": torch.ones(2, 2),
       "bias": torch.tensor([[10.0] * 2, [20.0] * 2, [30.0] * 2]),
       "scales": torch.tensor([[0.5, 2.0], [1.0, -1.0]]),
       "export_for_source_row": t32([[0, 2], [1, 1]])}


@pytest.mark.parametrize("mode, index", [(0, [3, 0, 1, 2]),     # column layout [k * N + n]
                                         (2, [3, 1, 0, 2])])    # row layout [n * K + k]
def test_finalize_routing_hand_case(mode, index):
    out = npu_moe_finalize_routing(ROWS, FIN["skip1"], FIN["skip2"], FIN["bias"], FIN["scales"], t32(index),
                                   FIN["export_for_source_row"], mode)
    assert out.tolist() == [[172.0] * 2, [199.0] * 2]


def test_finalize_routing_drop_pad_reads_dropped_as_zero_rows():
    # (E 2, C 2, H 2) = rows above; column index [3, -1, 1, 2]: token 0 -> rows 3, 1; token 1 -> dropped, row 2.
    # no scales: k = 2, weight 1.  token 0: 4 + 2 = 6; token 1: 0 + 3 = 3.
    rows = ROWS.reshape(2, 2, 2)
    out = npu_moe_finalize_routing(rows, None, None, None, None, t32([3, -1, 1, 2]), None, 1, 2)
    assert out.tolist() == [[6.0] * 2, [3.0] * 2]
    # with bias, a dropped slot still adds its expert's bias.  The bias has the rows' E = 2 experts (the tiling:
    # moe_finalize_routing_v2_tiling_membase.cpp:284-290 "the dim 0 of bias should be E when drop_pad_mode is
    # 1 or 3"); experts [[0, 1], [1, 1]]: token 0: (4 + 10) + (2 + 20) = 36; token 1: 20 + (3 + 20) = 43
    out = npu_moe_finalize_routing(rows, None, None, FIN["bias"][:2], None, t32([3, -1, 1, 2]),
                                   t32([[0, 1], [1, 1]]), 1, 2)
    assert out.tolist() == [[36.0] * 2, [43.0] * 2]


def test_compute_expert_tokens_hand_case():
    # sorted [0, 0, 0, 1, 1, 2]: expert 0 ends at 3, 1 at 5, 2 at 6
    assert npu_moe_compute_expert_tokens(t32([0, 0, 0, 1, 1, 2]), 3).tolist() == [3, 5, 6]
    # empty experts end where the previous one did: [1, 1, 3] over 5 experts -> [0, 2, 2, 3, 3]
    out = npu_moe_compute_expert_tokens(t32([1, 1, 3]), 5)
    assert out.tolist() == [0, 2, 2, 3, 3] and out.dtype == I32


def test_re_routing_hand_case():
    # 2 ranks x 3 experts, counts [[1, 2, 0], [3, 1, 3]]: tokens arrive rank 0 (e0: 0 | e1: 1, 2 | e2: -),
    # rank 1 (e0: 3, 4, 5 | e1: 6 | e2: 7, 8, 9); expert-major: e0 [0, 3, 4, 5], e1 [1, 2, 6], e2 [7, 8, 9]
    tokens = torch.arange(10, dtype=torch.float16)[:, None].repeat(1, 2)
    counts = torch.tensor([[1, 2, 0], [3, 1, 3]], dtype=torch.int64)
    out, scales, idx, num = npu_moe_re_routing(tokens, counts, per_token_scales=torch.arange(10.0) / 10)
    assert idx.tolist() == [0, 3, 4, 5, 1, 2, 6, 7, 8, 9] and idx.dtype == I32
    assert out[:, 1].tolist() == [0, 3, 4, 5, 1, 2, 6, 7, 8, 9] and out.dtype == torch.float16
    assert scales.tolist() == pytest.approx([0.0, 0.3, 0.4, 0.5, 0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    assert num.tolist() == [4, 3, 3] and num.dtype == torch.int64


# ============================================================================ Python-loop references

def ref_gating(x: torch.Tensor, finished: torch.Tensor | None, k: int):
    E = x.shape[-1]
    rows = x.float().reshape(-1, E).tolist()
    done = finished.reshape(-1).tolist() if finished is not None else [False] * len(rows)
    ys, ids = [], []
    for r, fin in zip(rows, done):
        m = max(r)
        ex = [math.exp(v - m) for v in r]
        p = [v / sum(ex) for v in ex]
        best = sorted(range(E), key=lambda e: -p[e])[:k]          # Python's sort is stable: ties keep e order
        ys.append([p[e] for e in best])
        ids.append([E] * k if fin else best)
    R = len(rows)
    row_idx = [[j * R + r for j in range(k)] for r in range(R)]
    return ys, ids, row_idx


def ref_route(expert_idx: torch.Tensor, start: int, end: int) -> list[int]:
    """Pair ids p = n * K + k with start <= expert < end, by (expert, p)."""
    e = expert_idx.reshape(-1).tolist()
    return sorted((p for p in range(len(e)) if start <= e[p] < end), key=lambda p: e[p])


def ref_init_routing_v2(x, expert_idx, start, row_idx_type):
    """Huawei's golden (cpu_op_exec): a stable sort of every pair, experts below the range moved to
    the end; the rows and the gather index cover the pairs in [start, end) only."""
    n, k = expert_idx.shape
    e = expert_idx.reshape(-1).tolist()
    order = sorted(range(n * k), key=lambda p: e[p] if e[p] >= start else 2 ** 40)
    return order


def ref_init_routing_v2_rows(x, expert_idx, start, end, row_idx_type):
    n, k = expert_idx.shape
    pairs = ref_route(expert_idx, start, end)
    ex = torch.zeros(n * k, x.shape[1], dtype=x.dtype)
    for i, p in enumerate(pairs):
        ex[i] = x[p // k]
    if row_idx_type == 1:
        idx = ref_init_routing_v2(x, expert_idx, start, row_idx_type)
    else:
        idx = [-1] * (n * k)
        for i, p in enumerate(pairs):
            idx[p] = i
    e = expert_idx.reshape(-1).tolist()
    counts = [sum(1 for p in pairs if e[p] == j) for j in range(start, end)]
    return ex, idx, counts


def ref_quant_row(row: torch.Tensor) -> tuple[list[int], float]:
    """This project's per-row int8 convention, one row at a time."""
    s = row.abs().max() / torch.tensor(127.0)
    if s == 0:
        return [0] * row.numel(), 0.0
    return (row / s).round().clamp(-128, 127).to(torch.int8).tolist(), float(s)


def ref_finalize(rows, skip1, skip2, bias, scales, index, experts, mode, k):
    H = rows.shape[-1]
    flat = rows.reshape(-1, H).double()
    N = index.numel() // k
    out = torch.zeros(N, H, dtype=torch.float64)
    for n in range(N):
        for s in (skip1, skip2):
            out[n] += s[n].double() if s is not None else 0
        for j in range(k):
            d = int(index[j * N + n] if mode in (0, 1) else index[n * k + j])
            v = flat[d] if d >= 0 else torch.zeros(H, dtype=torch.float64)
            if bias is not None:
                v = v + bias[int(experts[n, j])].double()
            out[n] += v * (float(scales[n, j]) if scales is not None else 1.0)
    return out


def ref_re_routing(counts: torch.Tensor) -> list[int]:
    c = counts.tolist()
    blocks, src = {}, 0
    for i, per_rank in enumerate(c):
        for j, m in enumerate(per_rank):
            blocks[i, j] = list(range(src, src + m))
            src += m
    return [t for j in range(len(c[0])) for i in range(len(c)) for t in blocks[i, j]]


# ============================================================================ properties on random inputs

SEEDS = range(4)


@pytest.mark.parametrize("seed", SEEDS)
def test_gating_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    E, k = 8, 1 + seed
    # integer logits give exact ties (equal inputs, equal fp32 softmax); real ones break them
    for x in (torch.randint(0, 3, (5, E), generator=g).float(), torch.randn(2, 3, E, generator=g)):
        finished = torch.rand(x.shape[:-1], generator=g) < 0.3
        y, expert, row = npu_moe_gating_top_k_softmax(x, finished, k)
        ys, ids, row_idx = ref_gating(x, finished, k)
        torch.testing.assert_close(y.reshape(-1, k), torch.tensor(ys))
        assert expert.reshape(-1, k).tolist() == ids and row.reshape(-1, k).tolist() == row_idx


@pytest.mark.parametrize("seed", SEEDS)
def test_init_routing_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    N, K, H, E = 7, 3, 5, 4
    x, experts = torch.randn(N, H, generator=g), torch.randint(0, E, (N, K), generator=g, dtype=I32)
    row_idx = torch.arange(N * K, dtype=I32).reshape(K, N).t().contiguous()
    active = [N, 3, 0][seed % 3]
    ex, row, sorted_e = npu_moe_init_routing(x, row_idx, experts, active)
    pairs = ref_route(experts, 0, E)
    ids = [int(row_idx.reshape(-1)[p]) for p in pairs]
    assert sorted_e.tolist() == sorted(experts.reshape(-1).tolist())
    assert torch.equal(ex, x[[i % N for i in ids[:min(active, N) * K]]].reshape(-1, H))
    assert all(int(row[i]) == pos for pos, i in enumerate(ids))


@pytest.mark.parametrize("seed", SEEDS)
def test_init_routing_v2_dropless_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    N, K, H, E = 9, 3, 4, 6
    x, experts = torch.randn(N, H, generator=g).bfloat16(), torch.randint(0, E, (N, K), generator=g, dtype=I32)
    start, end = [(0, 6), (2, 5), (1, 3), (0, 6)][seed]
    for active_num, row_idx_type in ((-1, 0), (N * K, 1), (-1, 1), (N * K, 0)):
        ex, idx, count, _ = npu_moe_init_routing_v2(x, experts, active_num=active_num, expert_num=E,
                                                    active_expert_range=[start, end], row_idx_type=row_idx_type,
                                                    expert_tokens_num_flag=True, expert_tokens_num_type=1)
        want_x, want_idx, want_count = ref_init_routing_v2_rows(x, experts, start, end, row_idx_type)
        assert torch.equal(ex, want_x) and idx.tolist() == want_idx and count.tolist() == want_count


@pytest.mark.parametrize("seed", SEEDS)
def test_init_routing_v2_dynamic_quant_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    N, K, H, E = 6, 2, 16, 4
    x = torch.randn(N, H, generator=g) * 3
    x[seed % N] = 0                                                        # an all-zero row
    experts = torch.randint(0, E, (N, K), generator=g, dtype=I32)
    smooth = torch.rand(E, H, generator=g) + 0.5 if seed % 2 else None
    ex, _, _, scale = npu_moe_init_routing_v2(x, experts, scale=smooth, expert_num=E, quant_mode=1, **COUNTS)
    e = experts.reshape(-1).tolist()
    for i, p in enumerate(ref_route(experts, 0, E)):
        row = x[p // K] * (smooth[e[p]] if smooth is not None else 1)
        q, s = ref_quant_row(row)
        assert ex[i].tolist() == q and float(scale[i]) == s


def test_dynamic_quant_scales_of_routing_and_of_npu_dynamic_quant():
    """init_routing_v2's quant_mode 1 divides the row max by 127 (Huawei's golden); npu_dynamic_quant
    multiplies it by fp32(1/127) as ops-nn's DynamicQuant kernel does: the scales may differ in the
    last bit, the int8 rows agree here."""
    from emu.npu.compute import npu_dynamic_quant
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(7)).bfloat16()
    x[3] = 0
    ex, _, _, scale = npu_moe_init_routing_v2(x, torch.zeros(12, 1, dtype=I32), expert_num=1, quant_mode=1,
                                              **COUNTS)
    y, s = npu_dynamic_quant(x)
    amax = x.float().abs().amax(-1)
    assert torch.equal(scale, amax / torch.tensor(127.0)) and torch.equal(s, amax * torch.tensor(1 / 127.0))
    assert torch.equal(ex, y) and not torch.equal(scale, s)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_finalize_routing_matches_reference(seed, mode):
    g = torch.Generator().manual_seed(seed)
    N, K, H, E, C = 5, 3, 4, 6, 4
    rows = torch.randn(E, C, H, generator=g) if mode in (1, 3) else torch.randn(N * K, H, generator=g)
    slots = rows.reshape(-1, H).shape[0]
    index = torch.randperm(slots, generator=g)[:N * K].to(I32)
    if mode in (1, 3):
        index[torch.rand(N * K, generator=g) < 0.3] = -1
    skip1, skip2 = torch.randn(N, H, generator=g), (torch.randn(N, H, generator=g) if seed % 2 else None)
    bias = torch.randn(E, H, generator=g) if seed < 2 else None
    scales = torch.rand(N, K, generator=g) if seed != 1 else None
    experts = torch.randint(0, E, (N, K), generator=g, dtype=I32)
    out = npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, index, experts, mode, K)
    want = ref_finalize(rows, skip1, skip2, bias, scales, index, experts, mode, K)
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_compute_expert_tokens_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    E = 3 + 2 * seed
    s = torch.randint(0, E, (20,), generator=g, dtype=I32).sort().values
    out = npu_moe_compute_expert_tokens(s, E)
    assert out.tolist() == [sum(1 for v in s.tolist() if v <= e) for e in range(E)]


@pytest.mark.parametrize("seed", SEEDS)
def test_re_routing_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (2 + seed, 3), generator=g, dtype=[I32, torch.int64][seed % 2])
    A = int(counts.sum())
    tokens = torch.randint(-100, 100, (A, 5), generator=g, dtype=torch.int8)
    out, scales, idx, num = npu_moe_re_routing(tokens, counts, per_token_scales=torch.randn(A, generator=g))
    want = ref_re_routing(counts)
    assert idx.tolist() == want and torch.equal(out, tokens[want])
    assert num.tolist() == counts.sum(0).tolist() and num.dtype == counts.dtype and scales.shape == (A,)


# ============================================================================ roundtrip

def drop_pad_layout(x, expert_idx, E, C):
    """Rows in an (E, C, H) drop/pad layout (each expert's first C pairs) and the gather index
    [pair] -> slot (-1 dropped): what finalize_routing's modes 1 / 3 read."""
    n, k = expert_idx.shape
    e = expert_idx.reshape(-1).tolist()
    ex = torch.zeros(E * C, x.shape[1], dtype=x.dtype)
    gather, fill = [-1] * (n * k), [0] * E
    for p in ref_route(expert_idx, 0, E):
        if fill[e[p]] < C:
            slot = e[p] * C + fill[e[p]]
            ex[slot], gather[p] = x[p // k], slot
            fill[e[p]] += 1
    return ex.reshape(E, C, -1), t32(gather)


@pytest.mark.parametrize("seed", SEEDS)
def test_roundtrip_v1_identity_experts(seed):
    """gating -> init_routing -> identity experts -> finalize (mode 0, scales = y): x * sum_k y."""
    g = torch.Generator().manual_seed(seed)
    N, E, K, H = 6, 5, 2, 8
    x = torch.randn(N, H, generator=g)
    y, experts, row_idx = npu_moe_gating_top_k_softmax(torch.randn(N, E, generator=g), None, K)
    ex, expanded_row_idx, _ = npu_moe_init_routing(x, row_idx, experts, N)
    out = npu_moe_finalize_routing(ex, None, None, None, y, expanded_row_idx, experts, 0)
    torch.testing.assert_close(out, x * y.sum(1, keepdim=True))


@pytest.mark.parametrize("seed", SEEDS)
def test_roundtrip_v2_identity_experts(seed):
    """init_routing_v2 (gather index) -> identity experts + bias -> finalize (mode 2): per token
    sum_k w * (x + bias[expert]); drop/pad rows (mode 3, an (E, C, H) layout made here) lose the
    dropped pairs' rows, not their bias."""
    g = torch.Generator().manual_seed(seed)
    N, E, K, H, C = 6, 4, 2, 8, 2
    x, w = torch.randn(N, H, generator=g), torch.rand(N, K, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(I32)
    bias = torch.randn(E, H, generator=g)
    ex, gather, _, _ = npu_moe_init_routing_v2(x, experts, expert_num=E, **COUNTS)
    out = npu_moe_finalize_routing(ex, None, None, bias, w, gather, experts, 2)
    torch.testing.assert_close(out, (w[..., None] * (x[:, None] + bias[experts.long()])).sum(1))
    ex, gather = drop_pad_layout(x, experts, E, C)
    out = npu_moe_finalize_routing(ex, None, None, bias, w, gather, experts, 3)
    kept = (gather >= 0).reshape(N, K, 1).float()
    torch.testing.assert_close(out, (w[..., None] * (kept * x[:, None] + bias[experts.long()])).sum(1))


# ============================================================================ errors

def v2(**kw):
    return npu_moe_init_routing_v2(X3B, E3B, **{"expert_num": 3, **COUNTS, **kw})


P, T = PARAM_INVALID, TILING_ERROR


@pytest.mark.parametrize("call, code, match", [
    # init_routing_v2: torch_npu's adapter, aclnn_moe_init_routing_v3.cpp (161002), the A2 / A3 tiling (561002)
    (lambda: v2(quant_mode=2), P, "quant_mode=2 gives an expanded_x dtype"),          # fp8 out: aclnn dtype list
    (lambda: v2(quant_mode=13), P, "quant_mode=13"),
    (lambda: v2(quant_mode=10), T, "quant_mode currently support -1 or 1"),
    (lambda: v2(quant_mode=1, x_dtype=285), P, "INT4 dynamic quantization uses quant_mode=13"),
    (lambda: v2(x_dtype=290), P, "x dtype torch_npu.hifloat8 (x_dtype) is not supported"),
    (lambda: v2(x_dtype=283), P, "relabels x (torch.float32) as a dtype of another element size"),
    (lambda: v2(drop_pad_mode=1, expert_capacity=2), T, "drop_pad_mode currently support 0"),
    (lambda: v2(expert_tokens_num_type=0), T, "expert_tokens_num_type currently not support 0"),
    (lambda: v2(expert_num=-1, active_expert_range=[0, 3]), T, "expert_num should be greater than 0"),
    (lambda: v2(active_expert_range=[1, 4]), T, "expert_end should be less than or equal to 3"),
    (lambda: v2(active_expert_range=[2, 2]), T, "expert_start should be less than expert_end"),
    (lambda: v2(active_expert_range=[1, 2, 3]), P, "The length of list active_expert_range should be 2"),
    (lambda: v2(active_num=-2), T, "active_num should be greater than or equal to -1"),
    (lambda: v2(active_num=0), T, "active_num currently should equal to 6(bs*k)"),
    (lambda: v2(row_idx_type=2), T, "row_idx_type currently support"),
    (lambda: v2(quant_mode=1, scale=torch.ones(3, 5)), P, "scale shape error"),
    (lambda: v2(quant_mode=1, scale=torch.ones(1, 2)), P, "scale shape error"),        # (1, H): the meta's, not aclnn's
    (lambda: v2(scale=torch.ones(2)), P, "scale shape error"),
    (lambda: v2(scale=torch.ones(3, dtype=torch.float16)), P, "scale dtype must be float32"),
    (lambda: npu_moe_init_routing_v2(X3B, E3B.long(), expert_num=3, **COUNTS), P, "expert_idx dtype"),
    (lambda: npu_moe_init_routing_v2(X3B[:2], E3B, expert_num=3, **COUNTS), P, "expertIdx shape error"),
    (lambda: npu_moe_init_routing_v2(X3B[0], E3B, expert_num=3, **COUNTS), P, "The x should be 2-Dimension"),
    # init_routing (v1): moe_init_routing_tiling.cpp
    (lambda: npu_moe_init_routing(X3, ROW3[:, :1], E3B, 3), T, "row_idx shape"),
    (lambda: npu_moe_init_routing(X3, ROW3, E3B, -1), T, "active_num must be a non-negative number"),
    (lambda: npu_moe_init_routing(X3, ROW3.long(), E3B, 3), P, "row_idx dtype"),
    # gating: moe_gating_top_k_softmax_tiling_base.cpp
    (lambda: npu_moe_gating_top_k_softmax(GATE_X, None, 0), T, "attr k(=0) is wrong"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X, None, 5), T, "attr k(=5) is wrong"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X[:0], None, 1), T, "contains zero"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X, torch.zeros(2, dtype=torch.bool), 1), T, "finished"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X.long(), None, 1), P, "dtype"),
    # finalize_routing: moe_finalize_routing_v2_tiling_membase.cpp
    (lambda: npu_moe_finalize_routing(ROWS, None, FIN["skip2"], None, FIN["scales"], t32([0, 1, 2, 3]), None, 0),
     T, "x2 parameter can't be inputted"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, None, FIN["scales"], t32([0, 1, 2, 3]), None, 4),
     T, "drop_pad_mode should be [0,3]"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, FIN["bias"], FIN["scales"], t32([0, 1, 2, 3]), None, 0),
     T, "the expert_idx must exist when bias exist"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, FIN["bias"][:1], FIN["scales"], t32([0, 1, 2, 3]),
                                      FIN["export_for_source_row"], 0), T, "E should be larger than or equal to K"),
    # compute_expert_tokens: moe_compute_expert_tokens_tiling.cpp
    (lambda: npu_moe_compute_expert_tokens(t32([0]), 0), T, "num_expert"),
    (lambda: npu_moe_compute_expert_tokens(t32([0]), 2049), T, "num_expert"),
    (lambda: npu_moe_compute_expert_tokens(torch.tensor([0]), 1), P, "dtype"),
    # re_routing: MoeReRoutingOpApi.cpp (161002), moe_re_routing_membase_tiling.cpp (561002); idx_type 1,
    # count mode 0 and hifloat8 / fp4 tokens are Ascend 950's (earlier: NotImplementedError)
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), expert_token_num_type=0), T,
     "expertTokenNumType should == 1."),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), idx_type=1), T, "idxType should == 0."),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1, dtype=torch.uint8), t32([[1, 1]]), tokens_dtype=290), T,
     "Failed to find tilingkey"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), tokens_dtype=15), P,
     "tokens_dtype only supports hifloat8, float4_e2m1fn_x2, float4_e1m2fn_x2 or None, but now is torch.bfloat16"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).float(), t32([[1, 1]])), T, "Failed to find tilingkey"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 16385).half(), t32([[1, 1]])), T, "tokenSize should <= 16384."),
    (lambda: npu_moe_re_routing(torch.zeros(2).half(), t32([[1, 1]])), P, "tokens dim should larger than 1"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), per_token_scales=torch.ones(3)),
     P, "per_token_scales"),
])
def test_errors(call, code, match):
    """What the A2 / A3 operator refuses raises AclnnError with its code (a RuntimeError, as torch_npu's)."""
    with pytest.raises(AclnnError, match=re.escape(match)) as e:
        call()
    assert e.value.code == code and isinstance(e.value, RuntimeError)


# ============================================================================ out of contract

@pytest.mark.parametrize("call, match", [
    (lambda: npu_moe_re_routing(torch.zeros(3, 1).half(), t32([[1, 1]])), "sum to the 3 tokens, its sum is 2"),
    (lambda: npu_moe_re_routing(torch.zeros(1, 1).half(), t32([[2, -1]])), "must be >= 0"),
    (lambda: v2(offset=torch.ones(1)), "offset is not taken"),
    (lambda: npu_moe_init_routing_v2(X3B, t32([[2, 0], [1, 5], [0, 1]]), expert_num=4, **COUNTS),
     "expert_idx values"),
    (lambda: npu_moe_init_routing(X3, ROW3 + 1, E3B, 3), "row_idx values"),
    (lambda: npu_moe_compute_expert_tokens(t32([1, 0]), 2), "non-decreasing"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, None, FIN["scales"], t32([0, 1, 2, 4]), None, 0),
     "values must lie"),
])
def test_out_of_contract_warns_and_strict_raises(call, match, monkeypatch):
    """Input the kernel silently accepts though the docs forbid it: computed as the kernel does, with a
    ContractWarning; EMU_STRICT=1 makes it AclnnError 161002."""
    with pytest.warns(ContractWarning, match=re.escape(match)):
        call()
    monkeypatch.setenv("EMU_STRICT", "1")
    with pytest.raises(AclnnError, match=re.escape(match)) as e:
        call()
    assert e.value.code == PARAM_INVALID


def _re_route(tokens, counts):
    return npu_moe_re_routing(tokens, counts)


def test_contract_warning_once_per_call_site():
    """One warning per call site (the first frame outside mc2-emu and torch) and check: a loop warns
    once, another line warns again; the warning points at the caller's line."""
    tokens = torch.arange(4, dtype=torch.float16)[:, None]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            npu_moe_re_routing(tokens, t32([[1, 1]]))                     # line A: sum 2 != 4 tokens
        npu_moe_re_routing(tokens, t32([[1, 1]]))                         # line B
        torch.ops.npu.npu_moe_re_routing(tokens, t32([[1, 1]]))           # line C, through the dispatcher
    mine = [w for w in seen if issubclass(w.category, ContractWarning)]
    assert len(mine) == 3 and {w.filename for w in mine} == {__file__}
    assert len({w.lineno for w in mine}) == 3


def test_re_routing_count_sum_different_from_the_tokens_is_what_the_kernel_copies():
    """Huawei's re_routing test passes counts summing to ~2x the tokens and checks shapes only; the A2 / A3
    kernel (moe_re_routing.h) copies each (rank, expert) block at the running sums of the counts without a
    bound check.  Rows placed inside [0, A) are copied, the rest are not (index -1, zero rows)."""
    tokens = torch.arange(5, dtype=torch.float16)[:, None]
    counts = t32([[2, 1], [1, 3]])                    # sum 7 > 5: rank 0: e0 0-1, e1 2; rank 1: e0 3, e1 4-6
    with pytest.warns(ContractWarning):
        out, _, idx, num = npu_moe_re_routing(tokens, counts)
    # expert-major: e0 [0, 1, 3] at 0-2, e1 [2, 4, 5, 6] at 3-6; rows 5, 6 (src 4..6 / dst >= 5) not written
    assert idx.tolist() == [0, 1, 3, 2, 4] and out[:, 0].tolist() == [0, 1, 3, 2, 4]
    assert num.tolist() == [3, 4]
    fewer = t32([[1, 1], [0, 1]])                     # sum 3 < 5: rows 3, 4 unwritten
    with pytest.warns(ContractWarning):
        out, _, idx, _ = npu_moe_re_routing(tokens, fewer)
    assert idx.tolist() == [0, 1, 2, -1, -1] and out[3:].abs().sum() == 0


# ============================================================================ torch_npu 2.14.0 wheel

WHEEL = npu_wheel.find_wheel()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason=f"torch_npu wheel not found: {npu_wheel.DOWNLOAD}")
OPS = {f.__name__: f for f in (npu_moe_init_routing, npu_moe_init_routing_v2, npu_moe_gating_top_k_softmax,
                               npu_moe_finalize_routing, npu_moe_compute_expert_tokens, npu_moe_re_routing)}


@needs_wheel
@pytest.mark.parametrize("op", sorted(OPS))
def test_signatures_equal_the_schema(op):
    got = [(p.name, p.kind == p.KEYWORD_ONLY, npu_wheel.REQUIRED if p.default is p.empty else p.default)
           for p in inspect.signature(OPS[op]).parameters.values()]
    assert got == [(p.name, p.keyword_only, p.default) for p in npu_wheel.schema(WHEEL, [op])[op]]


@pytest.fixture(scope="module")
def meta():
    """The wheel's meta functions of these ops, run with stand-ins for torch_npu's own modules."""
    found = npu_wheel.named_meta_functions(WHEEL, [f"{op}_meta" for op in OPS])
    return {op: found[f"{op}_meta"] for op in OPS}


def _meta_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    to_meta = (lambda v: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v)
    return tuple(map(to_meta, args)), {k: to_meta(v) for k, v in kwargs.items()}


def _v2_cases():
    """Calls the A2 / A3 tiling takes (N * K = 15)."""
    x, e = torch.randn(5, 4), torch.randint(0, 6, (5, 3), dtype=I32)
    base = {"expert_num": 6, "expert_tokens_num_flag": True, "expert_tokens_num_type": 1}
    return [((x, e), dict(base)), ((x, e), dict(base, active_num=15, expert_tokens_num_type=2)),
            ((x, e), dict(base, active_expert_range=[1, 4], row_idx_type=1)),
            ((x, e), dict(base, quant_mode=1, scale=torch.ones(6, 4), active_num=15)),
            ((x, e), dict(base, quant_mode=1, row_idx_type=1)),
            ((x, e), dict(base, scale=torch.ones(5)))]


def _cases():
    x, e = torch.randn(5, 4), torch.randint(0, 6, (5, 3), dtype=I32)
    row = torch.arange(15, dtype=I32).reshape(3, 5).t().contiguous()
    rows, idx = torch.randn(15, 4), torch.randperm(15).to(I32)
    return ([("npu_moe_init_routing", (x, row, e, n), {}) for n in (5, 2)] +
            [("npu_moe_init_routing_v2", a, k) for a, k in _v2_cases()] +
            [("npu_moe_gating_top_k_softmax", (torch.randn(*s, 6).half(), None, 2), {}) for s in ((5,), (2, 3))] +
            [("npu_moe_finalize_routing", (rows, None, None, None, torch.rand(5, 3), idx, e, 0), {}),
             ("npu_moe_finalize_routing", (rows, None, None, None, None, idx, e, 2, 3), {}),
             ("npu_moe_compute_expert_tokens", (t32([0, 1, 1, 3]), 5), {}),
             ("npu_moe_re_routing", (torch.zeros(6, 4).half(), t32([[1, 2], [0, 3]])), {}),
             ("npu_moe_re_routing", (torch.zeros(6, 4, dtype=torch.int8), torch.tensor([[1, 2], [0, 3]])),
              {"per_token_scales": torch.ones(6)})])


@needs_wheel
def test_outputs_have_the_meta_functions_shapes_and_dtypes(meta):
    for op, args, kwargs in _cases():
        got = OPS[op](*args, **kwargs)
        want = meta[op](*_meta_args(args, kwargs)[0], **_meta_args(args, kwargs)[1])
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert [(tuple(t.shape), t.dtype) for t in got] == [(tuple(t.shape), t.dtype) for t in want], (op, kwargs)


@needs_wheel
def test_registered_fakes_give_the_meta_functions_shapes_and_dtypes(meta):
    """torch.ops.npu.<op> on meta tensors runs the fake kernel (graph capture's view of the op)."""
    for op, args, kwargs in _cases():
        m_args, m_kwargs = _meta_args(args, kwargs)
        got = getattr(torch.ops.npu, op)(*m_args, **m_kwargs)
        want = meta[op](*m_args, **m_kwargs)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert [(tuple(t.shape), t.dtype) for t in got] == [(tuple(t.shape), t.dtype) for t in want], (op, kwargs)


@pytest.mark.parametrize("case", range(len(_cases())))
def test_opcheck(case):
    """torch.library.opcheck: schema (no mutation or aliasing it does not declare), fake kernel against
    the kernel, and AOT dispatch with dynamic shapes."""
    torch.manual_seed(case)
    op, args, kwargs = _cases()[case]
    result = torch.library.opcheck(getattr(torch.ops.npu, op).default, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result
