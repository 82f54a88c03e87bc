"""Quick start: dispatch -> your experts -> combine on any number of ranks, against a dense MoE.

    torchrun --nproc-per-node 4 examples/quickstart.py
"""
from datetime import timedelta

import torch
import torch.distributed as dist

import emu
import emu.testing

dist.init_process_group("gloo", timeout=timedelta(seconds=60))   # the timeout bounds your own collectives
ep, rank = dist.get_world_size(), dist.get_rank()
E, K, H, BS = 2 * ep, 2, 1024, 8                                 # 2 experts per rank, top-2
group = emu.group_name(dist.group.WORLD)                         # the EP group's name (or pass the group)

g = torch.Generator().manual_seed(rank)
x = torch.randn(BS, H, generator=g).bfloat16()
ids = torch.rand(BS, E, generator=g).argsort(dim=1)[:, :K].int()  # int32 (cast torch.topk's int64 ids)
weights = torch.rand(BS, K, generator=g)


def expert(e, rows):                                             # your expert e: here it scales by e + 1
    return (rows.float() * (e + 1)).bfloat16()


expand_x, _, assist, counts, ep_recv, _, _ = emu.moe_distribute_dispatch_v2(x, ids, group, ep, rank, E)
y = torch.zeros_like(expand_x)                                   # rows grouped by local expert, counts per expert
for local, (lo, hi) in enumerate(zip([0] + counts.cumsum(0).tolist()[:-1], counts.cumsum(0).tolist())):
    y[lo:hi] = expert(rank * 2 + local, expand_x[lo:hi])
x_out = emu.moe_distribute_combine_v2(y, ids, assist, ep_recv, weights, group, ep, rank, E)

assert torch.equal(x_out, emu.testing.dense_moe(x, ids, weights, expert))   # the same fp32 sum, bit for bit
print(f"rank {rank}: {int(counts.sum())} rows for experts {2 * rank}, {2 * rank + 1}; x_out equals a dense MoE")
dist.destroy_process_group()
