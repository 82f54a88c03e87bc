"""Test your own MoE layer on 4 ranks: dispatch -> your experts -> combine, against the
single-process reference (bit for bit) and a dense MoE (with a tolerance)."""
import pytest
import torch

import emu
import emu.testing as et

E, K, H, BS = 8, 2, 1024, 16                      # 8 experts on 4 ranks (2 each), top-2


def expert(e, rows):                              # your expert e: a SwiGLU MLP with seeded weights
    w = torch.randn(H, 2 * H, generator=torch.Generator().manual_seed(e)) / H ** 0.5
    a, b = (rows.float() @ w).chunk(2, dim=-1)
    return (torch.nn.functional.silu(a) * b).to(rows.dtype)


def moe_layer(x, ids, w, quant):                  # runs on every rank
    r = et.this_rank()
    out = emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E, quant_mode=quant)
    rows = out[0].float() * out[1][:, None] if quant else out[0]          # int8 rows * dynamic_scales
    y = torch.zeros(out[0].shape, dtype=x.dtype)
    ends = out[3].cumsum(0).tolist()                                       # expert_token_nums: counts
    for local, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        y[lo:hi] = expert(r.rank * 2 + local, rows[lo:hi].to(x.dtype))
    return out, y, emu.moe_distribute_combine_v2(y, ids, out[2], out[4], w, r.group_ep, r.size, r.rank, E)


@pytest.mark.emu_world(4)
@pytest.mark.parametrize("quant", [0, 2])
def test_moe_layer(emu_world, quant):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(BS, H, generator=g).bfloat16() for _ in range(4)]
    ids = [torch.rand(BS, E, generator=g).argsort(1)[:, :K].int() for _ in range(4)]
    ws = [torch.rand(BS, K, generator=g) for _ in range(4)]
    got = [o.get() for o in emu_world.run(moe_layer, et.per_rank(xs), et.per_rank(ids), et.per_rank(ws), quant)]
    want = et.expected_dispatch(xs, ids, ep_world_size=4, moe_expert_num=E, quant_mode=quant)
    x_outs = et.expected_combine([y for _, y, _ in got], ids, [d[2] for d in want], [d[4] for d in want], ws,
                                 ep_world_size=4, moe_expert_num=E)
    for r, (outs, _, x_out) in enumerate(got):
        assert all(torch.equal(a, b) for a, b in zip(outs, want[r]))       # every dispatch output
        assert torch.equal(x_out, x_outs[r])                               # combine, bit for bit
        dense = et.dense_moe(xs[r], ids[r], ws[r], expert)
        torch.testing.assert_close(x_out, dense, rtol=0.1 if quant else 0.02, atol=0.1 if quant else 0.02)
