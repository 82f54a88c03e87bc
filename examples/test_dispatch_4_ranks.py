"""The shortest multi-rank test: dispatch on 4 ranks, every rank against the reference."""
import pytest
import torch

import emu
import emu.testing as et

E, K, H, BS = 8, 2, 1024, 16                      # 8 experts on 4 ranks, top-2


def layer(x, ids):                                # runs on every rank
    r = et.this_rank()
    return emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E)


@pytest.mark.emu_world(4)
def test_dispatch(emu_world):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(BS, H, generator=g).bfloat16() for _ in range(4)]
    ids = [torch.rand(BS, E, generator=g).argsort(1)[:, :K].int() for _ in range(4)]
    got = [o.get() for o in emu_world.run(layer, et.per_rank(xs), et.per_rank(ids))]
    want = et.expected_dispatch(xs, ids, ep_world_size=4, moe_expert_num=E)
    for r in range(4):
        assert all(torch.equal(a, b) for a, b in zip(got[r], want[r]))
