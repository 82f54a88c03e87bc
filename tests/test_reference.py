"""The single-process reference on hand-worked worlds (docs/dispatch.md and our own cases)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emu.a2.hierarchy import inner_tables, outer_tables
from emu.core.attrs import MoeConfig
from emu.core.inputs import CombineInputs, DispatchInputs, SpecialExperts
from emu.core.numerics import combine_tokens
from emu.reference.a2 import (reference_combine_a2, reference_combine_hierarchy, reference_dispatch_a2,
                              reference_dispatch_hierarchy)
from emu.reference.a3 import reference_combine, reference_dispatch

BF = torch.bfloat16


def _x(rank: int, bs: int, h: int = 4) -> torch.Tensor:
    """Row t of rank r is filled with 10*r + t (exact in bf16), so rows identify themselves."""
    return (10 * rank + torch.arange(bs, dtype=torch.float32))[:, None].expand(bs, h).to(BF)


def _ids(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def _triples(out, n):
    return out.assist_info_for_combine[:3 * n].view(n, 3).tolist()


SPEC_IDS = [[[0, 3], [2, 3]], [[1, 0], [5, 4]], [[0, 1], [0, 2]], [[4, 5], [3, 0]]]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nums_type,token_nums", [(1, [5, 2]), (0, [5, 7])])
def test_spec_worked_example(nums_type, token_nums):
    """Spec docs/dispatch.md: W=4, S=1, N_s=1, E=6 (L=2), K=2, Bs=2."""
    cfg = MoeConfig(ep_world_size=4, moe_expert_num=6, shared_expert_rank_num=1, expert_token_nums_type=nums_type)
    outs = reference_dispatch(cfg, [DispatchInputs(_x(r, 2), _ids(SPEC_IDS[r])) for r in range(4)])
    r1 = outs[1]
    assert _triples(r1, 7) == [[0, 0, 0], [1, 0, 1], [2, 0, 0], [2, 1, 0], [3, 1, 1], [1, 0, 0], [2, 0, 1]]
    assert r1.ep_recv_counts.tolist() == [1, 2, 4, 5, 5, 6, 7, 7]
    assert r1.expert_token_nums.tolist() == token_nums
    # the payload is the source's row: row i holds 10*src + t
    assert r1.expand_x[:7, 0].tolist() == [0, 10, 20, 21, 31, 10, 20]
    assert r1.expand_x.shape == (16, 4) and bool((r1.expand_x[7:] == 0).all())    # A(MoE) = G*min(L,K) = 16
    r0 = outs[0]
    assert _triples(r0, 8) == [[r, t, 2] for r in range(4) for t in range(2)]
    assert r0.ep_recv_counts.tolist() == [2, 4, 6, 8]
    assert r0.expert_token_nums.tolist() == [8]
    assert r0.expand_x.shape == (8, 4)                                                # A(shared) = 8
    assert r0.assist_info_for_combine.shape == (128 * 8,)
    # rank 3 hosts experts 4, 5: (r1,t1,k1) (r3,t0,k0) | (r1,t1,k0) (r3,t0,k1)
    assert _triples(outs[3], 4) == [[1, 1, 1], [3, 0, 0], [1, 1, 0], [3, 0, 1]]
    assert outs[3].ep_recv_counts.tolist() == [0, 1, 1, 2, 2, 3, 3, 4]


@pytest.mark.timeout(30)
def test_tp2_layout_hand_worked():
    """ep 2 x tp 2, S=0, E=2 (L=1), K=1, Bs=2; world rank = ep*2 + tp.

    TP index 0 (world 0, 2): ids g0=[[1],[0]], g2=[[0],[0]]: EP0 gets (0,1,0),(1,0,0),(1,1,0);
    TP index 1 (world 1, 3): ids g1=[[0],[1]], g3=[[1],[1]]: EP0 gets (0,0,0).
    World 0 = own 3 rows then world 1's 1 row; epRecvCounts = own [1,3] + peer [1,1].
    """
    cfg = MoeConfig(ep_world_size=2, moe_expert_num=2, tp_world_size=2)
    ids = {0: [[1], [0]], 1: [[0], [1]], 2: [[0], [0]], 3: [[1], [1]]}
    outs = reference_dispatch(cfg, [DispatchInputs(_x(g, 2), _ids(ids[g])) for g in range(4)])
    g0, g1 = outs[0], outs[1]
    assert g0.expand_x.shape == (8, 4)                      # A*tp = G*min(L,K)*2 = 8
    assert g0.expand_x[:4, 0].tolist() == [1, 20, 21, 10]   # x_g0[1], x_g2[0], x_g2[1] | x_g1[0]
    assert _triples(g0, 3) == [[0, 1, 0], [1, 0, 0], [1, 1, 0]]
    assert g0.assist_info_for_combine[9:].abs().sum() == 0  # no triples for TP-gathered rows
    assert g0.ep_recv_counts.tolist() == [1, 3, 1, 1]
    assert g0.tp_recv_counts.tolist() == [3, 1]
    assert g0.expert_token_nums.tolist() == [4]
    assert g1.expand_x[:4, 0].tolist() == [10, 1, 20, 21]
    assert g1.ep_recv_counts.tolist() == [1, 1, 1, 3]
    assert g1.tp_recv_counts.tolist() == [3, 1]             # indexed by TP rank: [peer, own]
    assert outs[3].expand_x[:4, 0].tolist() == [11, 30, 31, 0]


@pytest.mark.timeout(30)
def test_shared_replicas():
    """W=4, S=2, N_s=1 => R=2: shared rank 0 serves sources 0, 2; rank 1 serves 1, 3."""
    cfg = MoeConfig(ep_world_size=4, moe_expert_num=2, shared_expert_rank_num=2)
    outs = reference_dispatch(cfg, [DispatchInputs(_x(r, 1), _ids([[r % 2]])) for r in range(4)])
    assert _triples(outs[0], 2) == [[0, 0, 1], [2, 0, 1]]
    assert _triples(outs[1], 2) == [[1, 0, 1], [3, 0, 1]]
    assert outs[0].ep_recv_counts.tolist() == [1, 1, 2, 2]
    assert outs[0].expand_x.shape == (2, 4)                   # maxBs * ceil(W/R) = 2
    assert _triples(outs[2], 2) == [[0, 0, 0], [2, 0, 0]]     # expert 0 on rank 2
    assert outs[3].ep_recv_counts.tolist() == [0, 1, 1, 2]


@pytest.mark.timeout(30)
def test_two_shared_experts_and_masks():
    """W=4, S=2, N_s=2 (R=1): shared j on rank j. 1-D mask {T,F,T} acts as {T,T,F};
    a 2-D mask drops slots but keeps the token for the shared experts if any bit is set."""
    cfg = MoeConfig(ep_world_size=4, moe_expert_num=2, shared_expert_num=2, shared_expert_rank_num=2)
    mask1 = torch.tensor([True, False, True])
    mask2 = torch.tensor([[False], [True], [False]])
    inputs = [DispatchInputs(_x(0, 3), _ids([[0], [1], [0]]), x_active_mask=mask1),
              DispatchInputs(_x(1, 3), _ids([[1], [0], [1]]), x_active_mask=mask2),
              DispatchInputs(_x(2, 3), _ids([[0], [0], [0]])),
              DispatchInputs(_x(3, 3), _ids([[1], [1], [1]]), x_active_mask=torch.zeros(3, dtype=torch.bool))]
    outs = reference_dispatch(cfg, inputs)
    # shared expert 1 on rank 1: slot K+1 = 2; source 0 tokens 0,1; source 1 token 1; source 2 all
    assert _triples(outs[1], 6) == [[0, 0, 2], [0, 1, 2], [1, 1, 2], [2, 0, 2], [2, 1, 2], [2, 2, 2]]
    assert outs[1].ep_recv_counts.tolist() == [2, 3, 6, 6]
    # expert 0 on rank 2: source 0 token 0, source 1 token 1, source 2 tokens 0,1,2
    assert _triples(outs[2], 5) == [[0, 0, 0], [1, 1, 0], [2, 0, 0], [2, 1, 0], [2, 2, 0]]
    assert _triples(outs[3], 1) == [[0, 1, 0]]               # source 1's expert-1 slots are masked


@pytest.mark.timeout(30)
def test_quant_half_to_even_and_scale_chain():
    """amax 127 => d = 1, so q = rint(x): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2 (half to even)."""
    cfg = MoeConfig(ep_world_size=2, moe_expert_num=2, quant_mode=2)
    row = torch.tensor([[0.5, 1.5, 2.5, -2.5, 127.0, 3.5]], dtype=BF)
    other = torch.tensor([[3.0, 0, 0, 0, 0, 0]], dtype=BF)
    outs = reference_dispatch(cfg, [DispatchInputs(row, _ids([[0]])), DispatchInputs(other, _ids([[0]]))])
    assert outs[0].expand_x.dtype == torch.int8
    assert outs[0].expand_x[0].tolist() == [0, 2, 2, -2, 127, 4]
    assert outs[0].dynamic_scales[0].item() == 1.0
    # second row: amax 3 => d = fp32(127/3), q = rint(3*d) = 127, scale = fp32(1/d) (not 3/127)
    d = np.float32(127) / np.float32(3)
    assert outs[0].expand_x[1].tolist() == [127, 0, 0, 0, 0, 0]
    assert outs[0].dynamic_scales[1].item() == float(np.float32(1) / d)


@pytest.mark.timeout(30)
def test_quant_smooth_row_per_destination():
    """Smooth scales: MoE expert e uses row N_s + e, shared expert j row j (docs/quantisation.md)."""
    cfg = MoeConfig(ep_world_size=2, moe_expert_num=1, shared_expert_rank_num=1, quant_mode=2)
    scales = torch.tensor([[1.0, 1.0], [2.0, 0.5]])          # row 0: shared 0, row 1: expert 0
    x = torch.tensor([[127.0, 127.0]], dtype=BF)
    outs = reference_dispatch(cfg, [DispatchInputs(x, _ids([[0]]), scales), DispatchInputs(x, _ids([[0]]), scales)])
    assert outs[0].expand_x[0].tolist() == [127, 127] and outs[0].dynamic_scales[0].item() == 1.0
    # expert copy: row*[2, .5] = [254, 63.5]; d = 127/254 = .5; q = [127, rint(31.75)=32]; scale = 2
    assert outs[1].expand_x[0].tolist() == [127, 32] and outs[1].dynamic_scales[0].item() == 2.0


def _combine_world(cfg, ids, scales, ys, **extra):
    """Dispatch with the reference, feed ``ys[g](expand_x)`` as expert output, combine."""
    n = len(ids)
    outs = reference_dispatch(cfg, [DispatchInputs(_x(g, len(ids[g])), _ids(ids[g]),
                                                   x_active_mask=extra.get("mask", {}).get(g)) for g in range(n)])
    comb = [CombineInputs(expand_x=ys(g, o.expand_x), expert_ids=_ids(ids[g]), assist_info=o.assist_info_for_combine,
                          ep_send_counts=o.ep_recv_counts, expert_scales=torch.tensor(scales[g]),
                          tp_send_counts=o.tp_recv_counts, x_active_mask=extra.get("mask", {}).get(g),
                          **extra.get("kw", {}).get(g, {}))
            for g, o in enumerate(outs)]
    return reference_combine(cfg, comb)


@pytest.mark.timeout(30)
def test_combine_weighted_sum_shared_unweighted():
    """W=2, S=1 (shared rank 0), E=1 on rank 1, K=1.  Expert output = 2*x, shared = x + 1.
    x_out[t] = w*2x + (x + 1), computed by hand for x = 10r + t."""
    cfg = MoeConfig(ep_world_size=2, moe_expert_num=1, shared_expert_rank_num=1)
    ids = {0: [[0], [0]], 1: [[0], [0]]}
    w = {0: [[0.5], [0.25]], 1: [[1.0], [2.0]]}

    def ys(g, ex):
        f = ex.float()
        return (f + 1).to(BF) if g == 0 else (2 * f).to(BF)
    x_out = _combine_world(cfg, ids, w, ys)
    assert x_out[0][:, 0].tolist() == [0.5 * 0 + 1, 0.25 * 2 + 2]
    assert x_out[1][:, 0].tolist() == [1.0 * 20 + 11, 2.0 * 22 + 12]


@pytest.mark.timeout(30)
def test_combine_special_experts_and_2d_mask():
    """W=2, S=0, E=2 (L=1), zero/copy/const one each (ids 2, 3, 4), K=3.

    Token 0: ids [0, 2, 3] w [1, 1, .5]: y0 + 0 + .5*oriX.  Token 1: ids [1, 4, 0] w [.5, .25, 1]
    with slot 2 masked: .5*y1 + .25*(a1*oriX + a2*V).  Experts: y = x (identity)."""
    cfg = MoeConfig(ep_world_size=2, moe_expert_num=2, shared_expert_rank_num=0, zero_expert_num=1,
                    copy_expert_num=1, const_expert_num=1)
    ids = {0: [[0, 2, 3], [1, 4, 0]], 1: [[0, 1, 2], [1, 0, 3]]}
    w = {0: [[1, 1, .5], [.5, .25, 1]], 1: [[1, 1, 1], [1, 1, 1]]}
    mask = {g: torch.tensor([[True, True, True], [True, True, False]]) for g in range(2)}
    ori = {g: torch.full((2, 4), 8.0, dtype=BF) for g in range(2)}
    kw = {g: dict(special=SpecialExperts.of(cfg, ori_x=ori[g], alpha1=torch.tensor([2.0], dtype=BF),
                                            alpha2=torch.tensor([0.5], dtype=BF), v=torch.full((1, 4), 4.0, dtype=BF)))
          for g in range(2)}
    x_out = _combine_world(cfg, ids, w, lambda g, ex: ex, mask=mask, kw=kw)
    assert x_out[0][:, 0].tolist() == [0 + 0 + 0.5 * 8, 0.5 * 1 + 0.25 * (2 * 8 + 0.5 * 4)]
    # rank 1 token 1: ids [1, 0, 3] slot 2 masked: y(11) + y(11) = 22
    assert x_out[1][:, 0].tolist() == [10 + 10 + 0, 11 + 11]


@pytest.mark.timeout(30)
def test_combine_tokens_matches_numpy_float32_loop():
    """combine_tokens against a plain numpy float32 loop over tokens and k (docs/combine.md)."""
    rng = np.random.default_rng(7)
    bs, k, h, E, z, c, q, ns = 6, 4, 16, 4, 1, 1, 2, 1
    ids = rng.integers(0, E + z + c + q, size=(bs, k)).astype(np.int32)
    w = rng.random((bs, k)).astype(np.float32)
    y = torch.from_numpy(rng.standard_normal((bs, k + ns, h)).astype(np.float32)).to(BF)
    ori = torch.from_numpy(rng.standard_normal((bs, h)).astype(np.float32)).to(BF)
    a1 = torch.tensor([0.5, 1.25], dtype=BF)
    a2 = torch.tensor([2.0, -0.75], dtype=BF)
    v = torch.from_numpy(rng.standard_normal((q, h)).astype(np.float32)).to(BF)
    mask = rng.random((bs, k)) < 0.8
    inp = CombineInputs(expand_x=y.reshape(-1, h), expert_ids=torch.from_numpy(ids),
                        assist_info=torch.zeros(0, dtype=torch.int32), ep_send_counts=torch.zeros(0, dtype=torch.int32),
                        expert_scales=torch.from_numpy(w),
                        special=SpecialExperts(first=E, zero=z, copy=c, const=q, ori_x=ori, alpha1=a1, alpha2=a2, v=v))
    got = combine_tokens(y, inp, torch.from_numpy(mask), ns).to(BF)
    yf, of, vf = y.float().numpy(), ori.float().numpy(), v.float().numpy()
    a1f, a2f = a1.float().numpy(), a2.float().numpy()
    want = np.zeros((bs, h), np.float32)
    for t in range(bs):
        acc = np.zeros(h, np.float32)
        for j in range(k):
            e = ids[t, j]
            if not mask[t, j] or E <= e < E + z:
                continue
            if e < E:
                acc = acc + yf[t, j] * w[t, j]
            elif e < E + z + c:
                acc = acc + of[t] * w[t, j]
            else:
                cc = e - (E + z + c)
                acc = acc + (of[t] * a1f[cc] + vf[cc] * a2f[cc]) * w[t, j]
        for j in range(ns):
            acc = acc + yf[t, k + j]
        want[t] = acc
    assert torch.equal(got, torch.from_numpy(want).to(BF))


def _doc_elastic_info():
    """The operator doc's example: W=8, ranks 2..5 removed, new 0..3 = old 0, 1, 6, 7."""
    return torch.tensor([1, 4, 1, 3, 0, 1, -1, -1, -1, -1, 2, 3, 0, 1, 6, 7, -1, -1, -1, -1], dtype=torch.int32)


@pytest.mark.timeout(30)
def test_elastic_doc_example_layout_and_result():
    """W=8, S=1, E=7, K=3, zero/copy/const one each (ids 7, 8, 9 with the ORIGINAL E), Bs=2.

    Survivors' tokens: t0 ids [0, 1, 7] (zero expert), t1 ids [0, 8, 2] (copy expert, oriX = 2).
    Old rank 6 = new id 2 hosts new expert 1: rows (src, 0, 1) for every new source src.
    x = 1, weights 0.1, identity experts, one shared expert (unweighted, +1):
    t0 = bf16(0.1 + 0.1 + 1) = 1.203125, t1 = bf16(0.1 + 0.1*2 + 0.1 + 1) = 1.3984375."""
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=7, shared_expert_rank_num=1, zero_expert_num=1,
                    copy_expert_num=1, const_expert_num=1)
    info = _doc_elastic_info()
    ids = _ids([[0, 1, 7], [0, 8, 2]])
    alive = [0, 1, 6, 7]
    inputs = [DispatchInputs(torch.ones(2, 4, dtype=BF), ids) if g in alive else None for g in range(8)]
    outs = reference_dispatch(cfg, inputs, info)
    assert [o is not None for o in outs] == [g in alive for g in range(8)]
    r6 = outs[6]
    assert _triples(r6, 4) == [[0, 0, 1], [1, 0, 1], [2, 0, 1], [3, 0, 1]]
    assert r6.ep_recv_counts.tolist() == [1, 2, 3, 4, 0, 0, 0, 0]      # max(W, W*L) = 8, W'*L' written
    assert r6.expert_token_nums.tolist() == [4]
    assert r6.expand_x.shape == (16, 4)                                # A = max(2*8, 16*1) = 16
    assert _triples(outs[0], 8) == [[s, t, 3] for s in range(4) for t in range(2)]   # new id 0: shared
    assert _triples(outs[7], 4) == [[0, 1, 2], [1, 1, 2], [2, 1, 2], [3, 1, 2]]      # new expert 2
    comb = [CombineInputs(expand_x=o.expand_x, expert_ids=ids, assist_info=o.assist_info_for_combine,
                          ep_send_counts=o.ep_recv_counts, expert_scales=torch.full((2, 3), 0.1),
                          special=SpecialExperts.of(cfg, ori_x=torch.full((2, 4), 2.0, dtype=BF),
                                                    alpha1=torch.ones(1, dtype=BF), alpha2=torch.ones(1, dtype=BF),
                                                    v=torch.ones(1, 4, dtype=BF)))
            if o is not None else None for o in outs]
    x_out = reference_combine(cfg, comb, info)
    for g in alive:
        assert x_out[g][:, 0].tolist() == [1.203125, 1.3984375], g
    assert x_out[2] is None


@pytest.mark.timeout(30)
def test_elastic_flag_zero_keeps_routing_but_elastic_shapes():
    """Flag 0: tables ignored (all 8 ranks route as usual) but every rank gets the elastic
    shapes: A = max(shared A, MoE A), ep_recv_counts max(W, W*L), token nums max(L, 1)."""
    cfg = MoeConfig(ep_world_size=8, moe_expert_num=14, shared_expert_rank_num=1)
    info = _doc_elastic_info().clone()
    info[0] = 0
    inputs = [DispatchInputs(_x(g, 2), _ids([[0, 1], [2, 3]])) for g in range(8)]
    plain = reference_dispatch(cfg, inputs)
    flag0 = reference_dispatch(cfg, inputs, info)
    for g in range(8):
        assert flag0[g].expand_x.shape == (32, 4)                      # max(2*8, 16*min(2,2)) = 32
        assert flag0[g].ep_recv_counts.shape == (16,) and flag0[g].expert_token_nums.shape == (2,)
        n = plain[g].ep_recv_counts.numel()
        assert torch.equal(flag0[g].ep_recv_counts[:n], plain[g].ep_recv_counts)
        rows = plain[g].expand_x.shape[0]
        assert torch.equal(flag0[g].expand_x[:rows], plain[g].expand_x)
    assert flag0[0].expert_token_nums.tolist() == [16, 0]              # shared rank writes element 0 only


@pytest.mark.timeout(30)
def test_a2_fullmesh_hand_worked():
    """docs/atlas-a2.md: W=16, E=16 (L=1), Bs=2, K=2, ids[r] = [[r, r+3], [r+3, r+5]] (mod 16).
    Rank 3 receives r0 (t0,k1), r0 (t1,k0), r3 (t0,k0), r14 (t1,k1); every rank's occ = [0,0,1,0]."""
    cfg = MoeConfig(ep_world_size=16, moe_expert_num=16, shared_expert_num=0)
    ids = {r: [[r, (r + 3) % 16], [(r + 3) % 16, (r + 5) % 16]] for r in range(16)}
    outs = reference_dispatch_a2(cfg, [DispatchInputs(_x(r, 2), _ids(ids[r])) for r in range(16)])
    r3 = outs[3]
    assert r3.expand_x[:4, 0].tolist() == [0, 1, 30, 141]            # x0[0], x0[1], x3[0], x14[1]
    assert r3.ep_recv_counts.tolist() == [2, 2, 2, 3] + [3] * 10 + [4, 4]
    assert r3.expert_token_nums.tolist() == [4]
    assert all(o.assist_info_for_combine[:4].tolist() == [0, 0, 1, 0] for o in outs)
    # mask [T, F] on rank 0: only t0 is sent, assist written for 2 entries
    masked = [DispatchInputs(_x(r, 2), _ids(ids[r]), x_active_mask=torch.tensor([True, False]) if r == 0 else None)
              for r in range(16)]
    m3 = reference_dispatch_a2(cfg, masked)[3]
    assert m3.ep_recv_counts.tolist() == [1, 1, 1, 2] + [2] * 10 + [3, 3]
    assert reference_dispatch_a2(cfg, masked)[0].assist_info_for_combine[:4].tolist() == [0, 0, 0, 0]
    # combine on rank 0 with identity experts: out[0] = XT(0 + x*w00 + x*w01)
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    comb = [CombineInputs(expand_x=o.expand_x, expert_ids=_ids(ids[r]), assist_info=o.assist_info_for_combine,
                          ep_send_counts=o.ep_recv_counts, expert_scales=w) for r, o in enumerate(outs)]
    x_out = reference_combine_a2(cfg, comb)
    assert x_out[0][:, 0].tolist() == [0.0 * 0.5 + 0.0 * 0.25, 1.0 * 1.0 + 1.0 * 2.0]
    bf = lambda v: torch.tensor(v, dtype=torch.float32).bfloat16().item()   # noqa: E731
    assert x_out[14][:, 0].tolist() == [bf(140 * 0.5 + 140 * 0.25), bf(141 * 1.0 + 141 * 2.0)]   # 423 -> 424


@pytest.mark.timeout(30)
def test_a2_hierarchy_hand_worked():
    """docs/atlas-a2.md (servers 0-7, 8-15): rank 3 as in docs/quantisation.md plus expand_scales
    [w0[0,1], w0[1,0], w3[0,0], w14[1,1]], ep_recv_counts of 16 + 2*32*2*2 = 272 entries; combine on
    rank 14: out[0] = XT((0 + P0) + P1) with P0 = XT(y1*w[0,1]) (server 0 first) and P1 = XT(y14*w[0,0])."""
    cfg = MoeConfig(ep_world_size=16, moe_expert_num=16, shared_expert_num=0)
    ids = {r: [[r, (r + 3) % 16], [(r + 3) % 16, (r + 5) % 16]] for r in range(16)}
    w = {r: torch.tensor([[0.5 + r, 0.25], [1.5, 2.0 + r]]) for r in range(16)}
    outs = reference_dispatch_hierarchy(cfg, [DispatchInputs(_x(r, 2), _ids(ids[r])) for r in range(16)],
                                        [w[r] for r in range(16)])
    r3 = outs[3]
    assert r3.expand_x[:4, 0].tolist() == [0, 1, 30, 141]
    assert r3.expand_scales[:4].tolist() == [0.25, 1.5, 3.5, 16.0]
    assert r3.ep_recv_counts.shape == (272,) and r3.ep_recv_counts[:16].tolist() == [2, 2, 2, 3] + [3] * 10 + [4, 4]
    assert r3.assist_info_for_combine.abs().sum() == 0
    # tail tables: source rank 14 (t0 [14, 1] on servers 1, 0; t1 [1, 3] on server 0) and rank 0
    assert outs[14].ep_recv_counts[176:182].tolist() == [2, 3, 0, 2, 1, 0]          # outerCnt, outerOff
    assert outs[0].ep_recv_counts[176:182].tolist() == [1, 2, 0, 1, 0, 0]
    # relay rank 6 for source server 1 (rank 14's tokens that hit server 0)
    assert outs[6].ep_recv_counts.view(torch.int16)[64:67].tolist() == [1, 3, 0]   # innerCnt[1] at byte 128
    assert outs[6].ep_recv_counts[48 + 64:48 + 64 + 4].tolist() == [64, 65, 192, 0]              # innerOff[1]
    # the distributed path's vectorised tables give the same words
    ids14 = np.array(ids[14])
    cnt, off = outer_tables(ids14, 1, 2)
    assert cnt.tolist() == [2, 3] and off.tolist() == [0, 2, 1, 0]
    icnt, ioff = inner_tables(ids14, np.arange(2), 0, 1, 16, 32, 2)
    assert icnt[:3].tolist() == [1, 3, 0] and ioff[:4].tolist() == [64, 65, 192, 0]
    comb = [CombineInputs(expand_x=o.expand_x, expert_ids=_ids(ids[r]), assist_info=o.assist_info_for_combine,
                          ep_send_counts=o.ep_recv_counts, expert_scales=w[r]) for r, o in enumerate(outs)]
    x_out = reference_combine_hierarchy(cfg, comb, [o.expand_scales for o in outs])
    bf = lambda v: torch.tensor(v, dtype=torch.float32).bfloat16().float().item()   # noqa: E731
    p0, p1 = bf(140 * 0.25), bf(140 * 14.5)
    assert x_out[14][0, 0].item() == bf(p0 + p1)
    # rank 14 token 1: ids [1, 3], both on server 0: one partial XT(141*1.5 + 141*16)
    assert x_out[14][1, 0].item() == bf(bf(141 * 1.5 + 141 * 16.0))
