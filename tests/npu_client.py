"""A MoE client written against torch_npu and torch.distributed only (run with
``torchrun -m emu.npu.run tests/npu_client.py``): dispatch -> grouped SwiGLU MLP -> combine,
in the two client modes, quant 0 and 2, V1 and V2, checked against a dense MoE."""
import sys

import torch
import torch.distributed as dist
import torch_npu

H, I, E_PER_RANK, K, CAP = 1024, 64, 2, 2, 6


def experts(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(n, H, 2 * I, generator=g) / 32).bfloat16()
    w2 = (torch.randn(n, I, H, generator=g) / 8).bfloat16()
    return w1, w2


def tokens(rank: int, bs: int, num_experts: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(bs, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:K] for _ in range(bs)]).int()
    w = torch.rand(bs, K, generator=g).bfloat16().float()           # weights rounded to bf16, then fp32
    return x, ids, w


def mlp(h, w1, w2, group_list, group_list_type, scales=None):
    if h.dtype == torch.int8:                                       # quantised dispatch: dequantise first
        h = (h.float() * scales[:, None]).bfloat16()
    a = torch_npu.npu_grouped_matmul(x=[h], weight=[w1], split_item=2, group_list_type=group_list_type,
                                     group_type=0, group_list=group_list)[0]
    a = torch_npu.npu_swiglu(a)
    return torch_npu.npu_grouped_matmul(x=[a], weight=[w2], split_item=2, group_list_type=group_list_type,
                                        group_type=0, group_list=group_list)[0]


def dense(x, ids, w, w1, w2):
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            a = torch_npu.npu_swiglu((x[t:t + 1].float() @ w1[e].float()).bfloat16())
            out[t] += w[t, k] * (a.float() @ w2[e].float()).bfloat16().float()[0]
    return out.bfloat16()


def main() -> int:
    dist.init_process_group(backend="cpu:gloo,npu:gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.npu.set_device(rank)
    assert torch.npu.is_available() and torch.npu.current_device() == rank
    name = dist.group.WORLD._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
    num_experts = E_PER_RANK * world
    w1_all, w2_all = experts(7, num_experts)
    mine = slice(rank * E_PER_RANK, (rank + 1) * E_PER_RANK)
    stream = torch.npu.Stream()
    worst = 0.0
    for mode in ("prefix-mask", "uneven-global-bs"):
        for quant in (0, 2):
            for api in ("v2", "v1"):
                bs = CAP - (rank % 3 if mode == "uneven-global-bs" else 0)
                x, ids, w = tokens(rank, CAP, num_experts)
                active = CAP - 1 - rank % 2
                common = dict(group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=num_experts,
                              group_tp=name, tp_world_size=1, tp_rank_id=0)
                if mode == "prefix-mask":                       # padded batch, 1-D prefix mask
                    mask = torch.arange(CAP) < active
                    extra = dict(x_active_mask=mask, global_bs=0)
                else:                                           # uneven batches, global_bs = capacity * ep
                    x, ids, w = x[:bs], ids[:bs], w[:bs]
                    mask = None
                    extra = dict(global_bs=CAP * world)
                ev = torch.npu.current_stream().record_event()
                with torch.npu.stream(stream):
                    stream.wait_event(ev)
                    if api == "v2":
                        out = torch_npu.npu_moe_distribute_dispatch_v2(x=x, expert_ids=ids, quant_mode=quant,
                                                                       expert_token_nums_type=0, **common, **extra)
                    else:
                        out = torch_npu.npu_moe_distribute_dispatch(x=x, expert_ids=ids, quant_mode=quant,
                                                                    expert_token_nums_type=0, **common, **extra)
                expand_x, scales, assist, token_nums, ep_counts = out[:5]
                h = mlp(expand_x, w1_all[mine], w2_all[mine], token_nums, 0, scales)
                tp_counts = torch.empty(1) if quant else out[5]
                if api == "v2":
                    y = torch_npu.npu_moe_distribute_combine_v2(expand_x=h, expert_ids=ids,
                                                                assist_info_for_combine=assist,
                                                                ep_send_counts=ep_counts, expert_scales=w,
                                                                tp_send_counts=tp_counts, expand_scales=out[6],
                                                                **common, **extra)
                else:
                    y = torch_npu.npu_moe_distribute_combine(expand_x=h, expert_ids=ids, expand_idx=assist,
                                                             ep_send_counts=ep_counts, expert_scales=w,
                                                             tp_send_counts=tp_counts, **common, **extra)
                torch.npu.synchronize()
                n = active if mask is not None else bs
                want = dense(x[:n], ids[:n], w[:n], w1_all, w2_all)
                err = (y[:n].float() - want.float()).abs().max().item() / (want.float().abs().max().item() + 1e-6)
                worst = max(worst, err)
                assert y.shape == (x.shape[0], H) and y.dtype == torch.bfloat16
                assert err < (0.08 if quant else 0.02), (rank, mode, quant, api, err)
                if mask is not None:
                    assert bool((y[n:] == 0).all())
                print(f"rank {rank} {mode:16s} quant {quant} {api}: max rel err vs dense {err:.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: CLIENT OK (worst {worst:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
