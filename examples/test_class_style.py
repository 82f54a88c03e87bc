"""The class style: every test method runs on every rank, once per world size."""
import torch

import emu
import emu.testing as et


class TestDispatchRouting(et.DistributedTest):
    world_size = [2, 4]

    def test_every_row_reaches_its_expert(self):
        r = et.this_rank()
        x = torch.full((4, 1024), float(r.rank)).bfloat16()          # every row holds its source rank
        ids = (torch.arange(4)[:, None] % r.size).int()               # token t goes to expert t % size
        out = emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, r.size)
        mine = sum(1 for t in range(4) if t % r.size == r.rank)       # tokens per source for my expert
        assert out[3].tolist() == [mine * r.size]                     # expert_token_nums
        sources = out[0][:mine * r.size, 0].float()
        assert sources.tolist() == [float(s) for s in range(r.size) for _ in range(mine)]

    def test_bad_attribute_raises_on_every_rank(self):
        r = et.this_rank()
        x, ids = torch.zeros(2, 1024).bfloat16(), torch.zeros(2, 1, dtype=torch.int32)
        try:
            emu.moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, r.size, quant_mode=1)
        except emu.AclnnError as exc:
            assert exc.code == 561002 and exc.kind == emu.ErrorKind.BAD_INPUT
        else:
            raise AssertionError("quant_mode=1 was accepted")
