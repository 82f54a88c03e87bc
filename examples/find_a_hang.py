"""Finding a hang: at step 1 rank 3 has no tokens and skips the MoE layer (MC2 wants every rank of
the group in every call), so where the others dispatch, it is already in the step's all-reduce.
Unwatched, every rank waits until a timeout; watched, every rank raises at once, naming rank 3
and both lines.

    EMU_WATCH=strict torchrun --nproc-per-node 4 examples/find_a_hang.py
"""
from datetime import timedelta

import torch
import torch.distributed as dist

import emu

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
ep, rank = dist.get_world_size(), dist.get_rank()
E, K, H, BS = 2 * ep, 2, 1024, 8
group = emu.group_name(dist.group.WORLD)


def moe_layer(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = emu.moe_distribute_dispatch_v2(x, ids, group, ep, rank, E)
    return emu.moe_distribute_combine_v2(out[0], ids, out[2], out[4], torch.ones(ids.shape), group, ep, rank, E)


for step in range(3):
    g = torch.Generator().manual_seed(step * ep + rank)
    bs = 0 if (step, rank) == (1, 3) else BS                 # rank 3 gets no tokens at step 1
    x = torch.randn(bs, H, generator=g).bfloat16()
    ids = torch.rand(bs, E, generator=g).argsort(dim=1)[:, :K].int()
    y = moe_layer(x, ids) if bs else x                      # the bug: skip the layer when there is nothing to do
    loss = y.float().square().sum().reshape(1)
    dist.all_reduce(loss)                                   # the step's end, on the same group
print(f"rank {rank}: 3 steps done")
dist.destroy_process_group()
