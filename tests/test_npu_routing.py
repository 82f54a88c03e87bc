"""torch_npu's MoE routing operators on the CPU (emu/npu/routing.py): hand-worked cases with
their values written out, properties against simple Python-loop references on random inputs,
the init_routing -> experts -> finalize_routing roundtrip, argument errors, and (when the
torch_npu 2.14.0 wheel is at hand) the signatures and output shapes / dtypes of the wheel's
schema and meta functions."""
from __future__ import annotations

import inspect
import math
import re

import npu_wheel
import pytest
import torch

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
    _, scatter, cumsum, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=3, row_idx_type=1,
                                                    expert_tokens_num_flag=True)
    assert scatter.tolist() == [1, 4, 2, 5, 0, 3] and cumsum.tolist() == [2, 4, 6]


def test_init_routing_v2_active_expert_range_and_active_num():
    # range [1, 3): pairs p1, p4 (expert 0) drop out.  Sorted: e1: p2, p5; e2: p0, p3 -> order [2, 5, 0, 3],
    # tokens [1, 2, 0, 1], then 2 zero rows.  gather: p2 -> 0, p5 -> 1, p0 -> 2, p3 -> 3, others -1.
    ex, gather, kv, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=4, active_expert_range=[1, 3],
                                                expert_tokens_num_flag=True, expert_tokens_num_type=2)
    assert ex[:, 0].tolist() == [2.0, 3.0, 1.0, 2.0, 0.0, 0.0]
    assert gather.tolist() == [2, -1, 0, 3, -1, 1]
    assert kv.tolist() == [[1, 2], [2, 2], [0, 0], [0, 0]]            # (expert_num, 2): [expert, count], zeros
    _, scatter, count, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=4, active_expert_range=[1, 3],
                                                   row_idx_type=1, expert_tokens_num_flag=True,
                                                   expert_tokens_num_type=1)
    assert scatter.tolist() == [2, 5, 0, 3, -1, -1] and count.tolist() == [2, 2]
    # active_num 3: 3 rows (the first 3 of the order); the index still covers every routed pair
    ex3, gather3, none, _ = npu_moe_init_routing_v2(X3B, E3B, expert_num=4, active_expert_range=[1, 3],
                                                    active_num=3)
    assert ex3[:, 0].tolist() == [2.0, 3.0, 1.0] and gather3.tolist() == [2, -1, 0, 3, -1, 1]
    assert none.shape == ()                                           # expert_tokens_num_flag False


def test_init_routing_v2_dynamic_quant_hand_case():
    # 2 tokens, k 1, experts [[1], [0]] -> rows: token 1 (expert 0), token 0 (expert 1).
    # token 1 is all zero -> y 0, scale 0.  token 0: max|x| = 254 -> scale 2,
    # y = round([254, -127, 63.5, 0] / 2) = round([127, -63.5, 31.75, 0]) = [127, -64, 32, 0] (half to even)
    x = torch.tensor([[254.0, -127.0, 63.5, 0.0], [0.0] * 4])
    ex, _, _, scale = npu_moe_init_routing_v2(x, t32([[1], [0]]), expert_num=2, quant_mode=1)
    assert ex.dtype == torch.int8 and ex.tolist() == [[0] * 4, [127, -64, 32, 0]]
    assert scale.tolist() == [0.0, 2.0]
    # smooth scale per expert (E 2, H 4); token 0 (expert 1) * [0.5, 2, 1, 1] = [127, -254, 63.5, 0]
    # -> scale 2, y = round([63.5, -127, 31.75, 0]) = [64, -127, 32, 0]
    smooth = torch.tensor([[1.0] * 4, [0.5, 2.0, 1.0, 1.0]])
    ex, _, _, scale = npu_moe_init_routing_v2(x, t32([[1], [0]]), scale=smooth, expert_num=2, quant_mode=1)
    assert ex.tolist() == [[0] * 4, [64, -127, 32, 0]] and scale.tolist() == [0.0, 2.0]


def test_init_routing_v2_static_quant_hand_case():
    # round(x * 2 + 0.5): [2.5, 5.5] -> [2, 6]; [-5.5, 600.5] -> [-6, 600 -> clamp 127]
    x = torch.tensor([[1.0, 2.5], [-3.0, 300.0]])
    ex, _, _, scale = npu_moe_init_routing_v2(x, t32([[0], [0]]), scale=torch.tensor([2.0]),
                                              offset=torch.tensor([0.5]), expert_num=1, quant_mode=0)
    assert ex.dtype == torch.int8 and ex.tolist() == [[2, 6], [-6, 127]] and scale.shape == ()


def test_init_routing_v2_drop_pad_hand_case():
    # experts [[0, 1], [0, 2], [0, 1]], E 3, capacity 2.  Pairs: e0: p0, p2, p4; e1: p1, p5; e2: p3.
    # e0 keeps p0, p2 (p4 dropped); slots [p0, p2 | p1, p5 | p3, pad] -> tokens [0, 1 | 0, 2 | 1, -]
    # gather [p] -> slot: p0 0, p1 2, p2 1, p3 4, p4 -1, p5 3.  counts before the drop: [3, 2, 1]
    ex, gather, count, scale = npu_moe_init_routing_v2(
        X3B, t32([[0, 1], [0, 2], [0, 1]]), scale=torch.tensor([10.0, 20.0, 30.0]), expert_num=3,
        expert_capacity=2, drop_pad_mode=1, expert_tokens_num_type=1, expert_tokens_num_flag=True)
    assert ex.shape == (3, 2, 2) and ex[..., 0].tolist() == [[1.0, 2.0], [1.0, 3.0], [2.0, 0.0]]
    assert gather.tolist() == [0, 2, 1, 4, -1, 3] and count.tolist() == [3, 2, 1]
    assert scale.tolist() == [10.0, 20.0, 10.0, 30.0, 20.0, 0.0]        # scale[token] per slot, 0 for the pad


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
    # with bias, a dropped slot still adds its expert's bias: token 0: (4 + 10) + (2 + 30) = 46; token 1: 20 + 23 = 43
    out = npu_moe_finalize_routing(rows, None, None, FIN["bias"], None, t32([3, -1, 1, 2]),
                                   FIN["export_for_source_row"], 1, 2)
    assert out.tolist() == [[46.0] * 2, [43.0] * 2]


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


def ref_init_routing_v2(x, expert_idx, start, end, active_num, row_idx_type):
    n, k = expert_idx.shape
    pairs = ref_route(expert_idx, start, end)
    rows = n * k if active_num <= 0 else min(active_num, n * k)
    ex = torch.zeros(rows, x.shape[1], dtype=x.dtype)
    for i, p in enumerate(pairs[:rows]):
        ex[i] = x[p // k]
    idx = [-1] * (n * k)
    for i, p in enumerate(pairs):
        if row_idx_type == 1:
            idx[i] = p
        else:
            idx[p] = i
    e = expert_idx.reshape(-1).tolist()
    counts = [sum(1 for p in pairs if e[p] == j) for j in range(start, end)]
    return ex, idx, counts


def ref_drop_pad(x, expert_idx, E, C):
    n, k = expert_idx.shape
    e = expert_idx.reshape(-1).tolist()
    ex = torch.zeros(E * C, x.shape[1], dtype=x.dtype)
    gather, fill = [-1] * (n * k), [0] * E
    for p in ref_route(expert_idx, 0, E):
        if fill[e[p]] < C:
            slot = e[p] * C + fill[e[p]]
            ex[slot], gather[p] = x[p // k], slot
            fill[e[p]] += 1
    return ex.reshape(E, C, -1), gather


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
    for active_num, row_idx_type in ((-1, 0), (0, 1), (10, 0), (40, 1)):
        ex, idx, count, _ = npu_moe_init_routing_v2(x, experts, active_num=active_num, expert_num=E,
                                                    active_expert_range=[start, end], row_idx_type=row_idx_type,
                                                    expert_tokens_num_flag=True, expert_tokens_num_type=1)
        want_x, want_idx, want_count = ref_init_routing_v2(x, experts, start, end, active_num, row_idx_type)
        assert torch.equal(ex, want_x) and idx.tolist() == want_idx and count.tolist() == want_count


@pytest.mark.parametrize("seed", SEEDS)
def test_init_routing_v2_drop_pad_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    N, K, H, E, C = 8, 2, 3, 4, 1 + seed
    x, experts = torch.randn(N, H, generator=g).half(), torch.randint(0, E, (N, K), generator=g, dtype=I32)
    ex, gather, _, _ = npu_moe_init_routing_v2(x, experts, expert_num=E, expert_capacity=C, drop_pad_mode=1,
                                               expert_tokens_num_type=1)
    want_x, want_gather = ref_drop_pad(x, experts, E, C)
    assert torch.equal(ex, want_x) and gather.tolist() == want_gather


@pytest.mark.parametrize("seed", SEEDS)
def test_init_routing_v2_dynamic_quant_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    N, K, H, E = 6, 2, 16, 4
    x = torch.randn(N, H, generator=g) * 3
    x[seed % N] = 0                                                        # an all-zero row
    experts = torch.randint(0, E, (N, K), generator=g, dtype=I32)
    smooth = torch.rand(E, H, generator=g) + 0.5 if seed % 2 else None
    ex, _, _, scale = npu_moe_init_routing_v2(x, experts, scale=smooth, expert_num=E, quant_mode=1)
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
    ex, _, _, scale = npu_moe_init_routing_v2(x, torch.zeros(12, 1, dtype=I32), expert_num=1, quant_mode=1)
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
    sum_k w * (x + bias[expert]); drop/pad (mode 3) loses the dropped pairs' rows, not their bias."""
    g = torch.Generator().manual_seed(seed)
    N, E, K, H, C = 6, 4, 2, 8, 2
    x, w = torch.randn(N, H, generator=g), torch.rand(N, K, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(I32)
    bias = torch.randn(E, H, generator=g)
    ex, gather, _, _ = npu_moe_init_routing_v2(x, experts, expert_num=E)
    out = npu_moe_finalize_routing(ex, None, None, bias, w, gather, experts, 2)
    torch.testing.assert_close(out, (w[..., None] * (x[:, None] + bias[experts.long()])).sum(1))
    ex, gather, _, _ = npu_moe_init_routing_v2(x, experts, expert_num=E, expert_capacity=C, drop_pad_mode=1,
                                               expert_tokens_num_type=1)
    out = npu_moe_finalize_routing(ex, None, None, bias, w, gather, experts, 3)
    kept = (gather >= 0).reshape(N, K, 1).float()
    torch.testing.assert_close(out, (w[..., None] * (kept * x[:, None] + bias[experts.long()])).sum(1))


# ============================================================================ errors

def v2(**kw):
    return npu_moe_init_routing_v2(X3B, E3B, **{"expert_num": 3, **kw})


@pytest.mark.parametrize("call, error, match", [
    (lambda: v2(quant_mode=2), NotImplementedError, "quant_mode=2"),
    (lambda: v2(quant_mode=13), NotImplementedError, "quant_mode=13"),
    (lambda: v2(quant_mode=10), ValueError, "quant_mode must be one of"),
    (lambda: v2(x_dtype=290), NotImplementedError, "x_dtype=290"),
    (lambda: v2(drop_pad_mode=1, expert_capacity=2, expert_tokens_num_type=0), NotImplementedError,
     "expert_tokens_num_type=0"),
    (lambda: v2(drop_pad_mode=2), ValueError, "drop_pad_mode"),
    (lambda: v2(drop_pad_mode=1, expert_tokens_num_type=1), ValueError, "expert_capacity > 0"),
    (lambda: v2(drop_pad_mode=1, expert_capacity=2, expert_tokens_num_type=1, row_idx_type=1), ValueError,
     "row_idx_type=0"),
    (lambda: v2(drop_pad_mode=1, expert_capacity=2, expert_tokens_num_type=1, active_expert_range=[1, 3]),
     ValueError, "active_expert_range"),
    (lambda: v2(expert_num=-1), ValueError, "expert_num > 0 or active_expert_range"),
    (lambda: v2(active_expert_range=[1, 4]), ValueError, "exceeds expert_num"),
    (lambda: v2(active_expert_range=[2, 2]), ValueError, "start < end"),
    (lambda: v2(active_num=-2), ValueError, "active_num"),
    (lambda: v2(quant_mode=0, scale=torch.ones(1)), ValueError, "needs scale and offset"),
    (lambda: v2(quant_mode=1, offset=torch.ones(1)), ValueError, "offset is only taken"),
    (lambda: v2(quant_mode=1, scale=torch.ones(3, 5)), ValueError, "scale must be"),
    (lambda: v2(scale=torch.ones(2)), ValueError, "scale must be"),
    (lambda: npu_moe_init_routing_v2(X3B, E3B.long(), expert_num=3), ValueError, "expert_idx dtype"),
    (lambda: npu_moe_init_routing_v2(X3B[:2], E3B, expert_num=3), ValueError, "rows"),
    (lambda: npu_moe_init_routing(X3, ROW3[:, :1], E3B, 3), ValueError, "row_idx shape"),
    (lambda: npu_moe_init_routing(X3, ROW3 + 1, E3B, 3), ValueError, "row_idx values"),
    (lambda: npu_moe_init_routing(X3, ROW3, E3B, -1), ValueError, "active_num"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X, None, 0), ValueError, "k must"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X, None, 5), ValueError, "k must"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X, torch.zeros(2, dtype=torch.bool), 1), ValueError, "finished"),
    (lambda: npu_moe_gating_top_k_softmax(GATE_X.long(), None, 1), ValueError, "dtype"),
    (lambda: npu_moe_finalize_routing(ROWS, None, FIN["skip2"], None, FIN["scales"], t32([0, 1, 2, 3]), None, 0),
     ValueError, "skip2 must be None"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, None, FIN["scales"], t32([0, 1, 2, 3]), None, 4),
     ValueError, "drop_pad_mode"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, None, FIN["scales"], t32([0, 1, 2, 4]), None, 0),
     ValueError, "values must lie"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, FIN["bias"], FIN["scales"], t32([0, 1, 2, 3]), None, 0),
     ValueError, "bias needs"),
    (lambda: npu_moe_finalize_routing(ROWS, None, None, None, FIN["scales"], t32([0, 1, 2]), None, 0),
     ValueError, "entries"),
    (lambda: npu_moe_compute_expert_tokens(t32([1, 0]), 2), ValueError, "non-decreasing"),
    (lambda: npu_moe_compute_expert_tokens(t32([0]), 0), ValueError, "num_expert"),
    (lambda: npu_moe_compute_expert_tokens(torch.tensor([0]), 1), ValueError, "dtype"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), expert_token_num_type=0),
     NotImplementedError, "expert_token_num_type=0"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), idx_type=1), NotImplementedError,
     "idx_type=1"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), tokens_dtype=290), NotImplementedError,
     "tokens_dtype=290"),
    (lambda: npu_moe_re_routing(torch.zeros(3, 1).half(), t32([[1, 1]])), ValueError, "must equal"),
    (lambda: npu_moe_re_routing(torch.zeros(0, 1).half(), t32([[1, -1]])), ValueError, ">= 0"),
    (lambda: npu_moe_re_routing(torch.zeros(2, 1).half(), t32([[1, 1]]), per_token_scales=torch.ones(3)),
     ValueError, "per_token_scales"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=re.escape(match)):
        call()


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
    x, e = torch.randn(5, 4), torch.randint(0, 6, (5, 3), dtype=I32)
    base = {"expert_num": 6, "expert_tokens_num_flag": True}
    return [((x, e), dict(base)), ((x, e), dict(base, active_num=7, expert_tokens_num_type=2)),
            ((x, e), dict(base, active_expert_range=[1, 4], row_idx_type=1, expert_tokens_num_type=1)),
            ((x, e), {"expert_num": 6, "quant_mode": 1, "scale": torch.ones(1, 4), "active_num": 40}),
            ((x, e), dict(base, quant_mode=0, scale=torch.ones(1), offset=torch.zeros(1))),
            ((x, e), dict(base, scale=torch.ones(5))),
            ((x, e), dict(base, drop_pad_mode=1, expert_capacity=2, expert_tokens_num_type=1))]


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
