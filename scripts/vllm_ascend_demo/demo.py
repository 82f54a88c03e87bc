"""vllm-ascend's real MC2 token dispatcher (TokenDispatcherWithMC2) and MoE MLP
(unified_apply_mlp) on CPU ranks through mc2-emu's torch_npu, compared with a dense MoE.

    torchrun --nproc-per-node 4 -m emu.npu.run scripts/vllm_ascend_demo/demo.py

(install: see README, "vllm-ascend on CPU").  Nothing of vllm / vllm-ascend is modified; the
script does what vllm's model runner would have done before the MoE layer runs: the config,
the distributed groups, the MC2 token capacity.
"""
import os

import torch
import torch.distributed as dist
import torch_npu  # noqa: F401  (mc2-emu's, installed by emu.npu.run)
from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

import vllm_ascend.ascend_forward_context as forward_context
from vllm_ascend.ascend_config import init_ascend_config
from vllm_ascend.distributed.parallel_state import init_ascend_model_parallel
from vllm_ascend.ops.fused_moe.moe_mlp import unified_apply_mlp
from vllm_ascend.ops.fused_moe.moe_runtime_args import (build_fused_experts_input, build_mlp_compute_input,
                                                         build_token_dispatch_input)
from vllm_ascend.ops.fused_moe.token_dispatcher import TokenDispatcherWithMC2
from vllm_ascend.quantization.quant_type import QuantType

H, I, E_LOCAL, K, TOKENS = 1024, 128, 2, 2, 8


def dense(x, ids, w, w1, w2):
    """Reference MoE in one process: sum_k w[t,k] * down(swiglu(up(x_t))) with expert ids[t,k]."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            h = (x[t:t + 1].float() @ w1[e].float()).bfloat16()
            a, b = h.float().chunk(2, dim=-1)
            h = (torch.nn.functional.silu(a) * b).bfloat16()
            out[t] += w[t, k] * (h.float() @ w2[e].float()).bfloat16().float()[0]
    return out.bfloat16()


def model_config(num_experts: int):
    """The one choice a user makes: a (tiny, local, weightless) MoE model config."""
    import json
    import tempfile

    from vllm.config import ModelConfig
    d = os.path.join(tempfile.gettempdir(), f"mc2emu-tiny-moe-{num_experts}")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f"config.json.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
                   "intermediate_size": 2 * I, "moe_intermediate_size": I, "num_experts": num_experts,
                   "num_experts_per_tok": K, "num_hidden_layers": 1, "num_attention_heads": 8,
                   "num_key_value_heads": 8, "head_dim": H // 8, "vocab_size": 1024, "max_position_embeddings": 256,
                   "torch_dtype": "bfloat16", "norm_topk_prob": True, "decoder_sparse_step": 1,
                   "mlp_only_layers": []}, f)
    os.replace(tmp, os.path.join(d, "config.json"))          # every rank writes it; atomically
    return ModelConfig(model=d, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=256)


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    num_experts = E_LOCAL * world
    config = VllmConfig(model_config=model_config(num_experts),
                        parallel_config=ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=True))
    with set_current_vllm_config(config):
        init_distributed_environment(world, rank, "env://", rank, backend="cpu:gloo,npu:gloo")
        initialize_model_parallel(tensor_model_parallel_size=world)
        init_ascend_config(config)
        init_ascend_model_parallel(config.parallel_config)
        forward_context._mc2_tokens_capacity = TOKENS * world     # the model runner sets this at start-up
        dispatcher = TokenDispatcherWithMC2(top_k=K, num_experts=num_experts)

        g = torch.Generator().manual_seed(0)                      # same weights on every rank
        w1 = (torch.randn(num_experts, H, 2 * I, generator=g) / 32).bfloat16()
        w2 = (torch.randn(num_experts, I, H, generator=g) / 8).bfloat16()
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(TOKENS, H, generator=g).bfloat16()
        logits = torch.randn(TOKENS, num_experts, generator=g)
        weights, ids = torch.softmax(logits, -1).topk(K, dim=-1)
        ids = ids.int()
        weights = weights.bfloat16().float()
        mine = slice(rank * E_LOCAL, (rank + 1) * E_LOCAL)
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[mine] = torch.arange(E_LOCAL, dtype=torch.int32)
        mc2_mask = torch.ones(TOKENS, dtype=torch.bool)

        fused = build_fused_experts_input(hidden_states=x, topk_weights=weights, topk_ids=ids,
                                          w1=w1[mine].transpose(1, 2).contiguous(),
                                          w2=w2[mine].transpose(1, 2).contiguous(),
                                          quant_type=QuantType.NONE, dynamic_eplb=False, expert_map=expert_map,
                                          mc2_mask=mc2_mask, need_trans=True)
        dispatched = dispatcher.token_dispatch(build_token_dispatch_input(fused_experts_input=fused, topk_ids=ids))
        mlp_out = unified_apply_mlp(mlp_compute_input=build_mlp_compute_input(
            fused_experts_input=fused, token_dispatch_output=dispatched, use_fusion_ops=False))
        if isinstance(mlp_out, tuple):
            mlp_out = mlp_out[0]
        y = dispatcher.token_combine(hidden_states=mlp_out, combine_metadata=dispatched.combine_metadata)

        want = dense(x, ids, weights, w1, w2)
        err = ((y.float() - want.float()).abs().max() / want.float().abs().max()).item()
        rows = int(dispatched.group_list[-1]) if dispatched.group_list_type == 0 else int(dispatched.group_list.sum())
        print(f"rank {rank}: group {dispatcher.moe_all_to_all_group_name}, {rows} rows for experts "
              f"{list(range(num_experts))[mine]}, out {tuple(y.shape)} {y.dtype}, "
              f"max |MC2 - dense| / max |dense| = {err:.2e}", flush=True)
        assert err < 1e-2, err
    dist.barrier()
    if rank == 0:
        print("DEMO OK: vllm-ascend's MC2 dispatcher on mc2-emu matches a dense MoE on every rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
