"""One MoE layer written three ways as Ascend clients write it, every operator through
``torch.ops.npu`` on npu tensors (run on each rank of a world by tests/test_npu_moe_layer.py):

* ``mc2``: dispatch_v2 (x_active_mask, expert_token_nums_type 0) -> grouped matmul (cumulative
  group list, split_item 2) -> swiglu -> grouped matmul -> combine_v2 (with expand_scales);
* ``all_to_all``: torch.histc counts -> token permute -> all_to_all_single of counts and rows ->
  re-routing to expert-major -> grouped matmul with counts -> swiglu -> grouped matmul -> back
  to source-major -> all_to_all_single -> token unpermute with the routing weights as probs;
* ``local``: one rank holding every expert: init_routing_v2 (counts) -> grouped matmul with
  counts -> swiglu -> grouped matmul -> token unpermute with probs.

Every expert is a SwiGLU MLP: ``silu(x @ w1[:, :F]) * (x @ w1[:, F:]) @ w2``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.backends.debugging import aot_eager

import emu.npu
from emu.testing import this_rank

E, K, H, F, BS = 8, 2, 1024, 64, 8         # experts, top-k, hidden, expert intermediate, tokens per rank


def weights() -> tuple[torch.Tensor, torch.Tensor]:
    """w1 (E, H, 2F), w2 (E, F, H) bf16, the same on every rank and in the test."""
    g = torch.Generator().manual_seed(21)
    w1 = torch.randn(E, H, 2 * F, generator=g) / H ** 0.5
    w2 = torch.randn(E, F, H, generator=g) / F ** 0.5
    return w1.bfloat16(), w2.bfloat16()


def rank_inputs(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (BS, H) bf16, expert ids (BS, K) int32 (distinct per token), routing weights (BS, K) fp32, and
    x_active_mask (BS,): the last ``rank % 3`` tokens inactive (a prefix mask, as the op takes it)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BS, H, generator=g).bfloat16()
    ids = torch.rand(BS, E, generator=g).argsort(1)[:, :K].to(torch.int32)
    w = torch.softmax(torch.randn(BS, K, generator=g), -1)
    mask = torch.arange(BS) < BS - rank % 3
    return x, ids, w, mask


def _mlp(rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, group_list: torch.Tensor,
         group_list_type: int) -> torch.Tensor:
    """Grouped SwiGLU MLP over expert-major rows: group g's rows through expert g's weights."""
    npu = torch.ops.npu
    h = npu.npu_grouped_matmul([rows], [w1], group_list=group_list, split_item=2, group_type=0,
                               group_list_type=group_list_type)[0]
    a = npu.npu_swiglu(h)
    return npu.npu_grouped_matmul([a], [w2], group_list=group_list, split_item=2, group_type=0,
                                  group_list_type=group_list_type)[0]


def mc2(x, ids, w, mask, w1_local, w2_local, group: str, rank: int, world: int) -> torch.Tensor:
    npu = torch.ops.npu
    expand_x, _, assist, token_ends, ep_recv, _, expand_scales = npu.npu_moe_distribute_dispatch_v2(
        x, ids, group, world, rank, E, x_active_mask=mask, expert_token_nums_type=0)
    y = _mlp(expand_x, w1_local, w2_local, token_ends, group_list_type=0)
    return npu.npu_moe_distribute_combine_v2(y, ids, assist, ep_recv, w, group, world, rank, E,
                                             x_active_mask=mask, expand_scales=expand_scales)


def all_to_all(x, ids, w, w1_local, w2_local, pg, world: int) -> torch.Tensor:
    npu = torch.ops.npu
    local = E // world
    counts = torch.histc(ids, bins=E, min=0, max=E)                      # int32 on the NPU
    permuted, sorted_indices = npu.npu_moe_token_permute(x, ids, ids.numel())
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=pg)                   # [src, local expert] counts
    send = counts.view(world, local).sum(1).tolist()
    recv = received.view(world, local).sum(1).tolist()
    rows = x.new_empty((sum(recv), x.shape[1]))
    dist.all_to_all_single(rows, permuted, recv, send, group=pg)
    by_expert, _, gather_index, expert_counts = npu.npu_moe_re_routing(rows, received.view(world, local))
    y = _mlp(by_expert, w1_local, w2_local, expert_counts.to(torch.int64), group_list_type=1)
    back_rows = torch.empty_like(y).index_copy_(0, gather_index.long(), y)   # source-major again
    back = torch.empty_like(permuted)
    dist.all_to_all_single(back, back_rows, send, recv, group=pg)
    return npu.npu_moe_token_unpermute(back, sorted_indices, w.to(x.dtype))


def local(x, ids, w, w1, w2) -> torch.Tensor:
    npu = torch.ops.npu
    rows, row_idx, counts, _ = npu.npu_moe_init_routing_v2(
        x, ids, active_num=ids.numel(), expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True)
    y = _mlp(rows, w1, w2, counts, group_list_type=1)
    return npu.npu_moe_token_unpermute(y, row_idx.abs(), w.to(x.dtype))


def three_ways(step: int = 0) -> dict[str, torch.Tensor]:
    """The layer on this rank's tokens, three ways; outputs as CPU tensors (with the npu device seen)."""
    r = this_rank()
    emu.npu.install()
    torch.npu.set_device(r.rank)
    x, ids, w, mask = (t.npu() for t in rank_inputs(r.rank, step))
    w1, w2 = (t.npu() for t in weights())
    lo, hi = r.rank * E // r.size, (r.rank + 1) * E // r.size
    out = {"mc2": mc2(x, ids, w, mask, w1[lo:hi], w2[lo:hi], r.group_ep, r.rank, r.size),
           "all_to_all": all_to_all(x, ids, w, w1[lo:hi], w2[lo:hi], r.ep_group, r.size),
           "local": local(x, ids, w, w1, w2)}
    assert all(t.device == torch.device("npu", r.rank) for t in out.values()), {k: t.device for k, t in out.items()}
    return {k: t.cpu() for k, t in out.items()}


def torch_mlp(rows: torch.Tensor, token_ends: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The local experts in plain torch, static shapes (a graph without data-dependent sizes): each
    row's expert from expert_token_nums' cumulative ends, every expert's MLP on every row, selected."""
    which = torch.searchsorted(token_ends, torch.arange(rows.shape[0], device=rows.device), right=True)
    h = torch.einsum("ah,lhf->laf", rows.float(), w1.float())
    a = torch.nn.functional.silu(h[..., :F]) * h[..., F:]
    y = torch.einsum("laf,lfh->lah", a, w2.float())
    pick = (which[None, :] == torch.arange(w1.shape[0], device=rows.device)[:, None]).float()
    return (y * pick[..., None]).sum(0).to(rows.dtype)


def mc2_torch_expert(x, ids, w, w1_local, w2_local, group: str, rank: int, world: int) -> torch.Tensor:
    npu = torch.ops.npu
    expand_x, _, assist, token_ends, ep_recv, _, expand_scales = npu.npu_moe_distribute_dispatch_v2(
        x, ids, group, world, rank, E, expert_token_nums_type=0)
    y = torch_mlp(expand_x, token_ends, w1_local, w2_local)
    return npu.npu_moe_distribute_combine_v2(y, ids, assist, ep_recv, w, group, world, rank, E,
                                             expand_scales=expand_scales)


def compiled(steps: int = 3) -> dict:
    """torch.compile(fullgraph=True, backend="aot_eager") of dispatch -> expert -> combine, with the
    expert in torch and with the grouped-matmul expert of ``mc2``, on ``steps`` batches of new data:
    eager and compiled outputs, the graphs Dynamo captured (their call targets) and compile counts."""
    r = this_rank()
    emu.npu.install()
    torch.npu.set_device(r.rank)
    lo, hi = r.rank * E // r.size, (r.rank + 1) * E // r.size
    w1, w2 = (t[lo:hi].npu() for t in weights())
    graphs: list[list[str]] = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return aot_eager(gm, example_inputs)

    fns = {"torch_expert": lambda x, ids, w, mask: mc2_torch_expert(x, ids, w, w1, w2, r.group_ep, r.rank, r.size),
           "grouped_matmul": lambda x, ids, w, mask: mc2(x, ids, w, mask, w1, w2, r.group_ep, r.rank, r.size)}
    out = {}
    for name, fn in fns.items():
        before = len(graphs)
        fast = torch.compile(fn, fullgraph=True, backend=backend)
        runs = []
        for step in range(steps):
            args = [t.npu() for t in rank_inputs(r.rank, step + 1)]
            eager, graph = fn(*args), fast(*args)
            runs.append((eager.cpu(), graph.cpu(), str(graph.device)))
        out[name] = {"runs": runs, "graphs": graphs[before:]}
    return out


def opchecks() -> dict[str, dict[str, str]]:
    """torch.library.opcheck of every MC2 op and the barrier on a representative call of this world
    (every rank runs the same checks, so their calls meet); outputs of one check feed the next."""
    r = this_rank()
    emu.npu.install()
    torch.npu.set_device(r.rank)
    npu = torch.ops.npu
    x, ids, w, mask = (t.npu() for t in rank_inputs(r.rank))
    common = (r.group_ep, r.size, r.rank, E)
    out = {}

    def check(name: str, op, *args, **kwargs):
        result = torch.library.opcheck(op, args, kwargs, raise_exception=False)
        out[name] = {test: verdict if verdict == "SUCCESS" else repr(verdict) for test, verdict in result.items()}
        return op(*args, **kwargs)

    check("dispatch_v2_expert_scales", npu.npu_moe_distribute_dispatch_v2.default, x, ids, *common, expert_scales=w)
    d = check("dispatch_v2", npu.npu_moe_distribute_dispatch_v2.default, x, ids, *common, x_active_mask=mask)
    check("combine_v2", npu.npu_moe_distribute_combine_v2.default, d[0], ids, d[2], d[4], w, *common,
          x_active_mask=mask, expand_scales=d[6])
    check("add_rms_norm", npu.npu_moe_distribute_combine_add_rms_norm.default, d[0], ids, d[2], d[4], w,
          x[:, None], torch.ones(H, dtype=torch.bfloat16).npu(), *common, x_active_mask=mask)
    v1 = check("dispatch_v1", npu.npu_moe_distribute_dispatch.default, x, ids, *common, quant_mode=2)
    check("combine_v1", npu.npu_moe_distribute_combine.default, (v1[0].float() * v1[1][:, None]).bfloat16(), ids,
          v1[2], v1[4], w, *common)
    check("barrier", npu._npu_distribute_barrier.default, x, r.group_ep, r.size)
    return out


def expand_scales_shapes() -> tuple[tuple, tuple, tuple]:
    """expand_scales of dispatch_v2 without expert_scales: the kernel's (EMU_ALLOCATION) and the
    fake kernel's (torch_npu 2.14's meta function), and with expert_scales given (both A)."""
    r = this_rank()
    emu.npu.install()
    x, ids, w, _ = (t.npu() for t in rank_inputs(r.rank))
    real = torch.ops.npu.npu_moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E)
    given = torch.ops.npu.npu_moe_distribute_dispatch_v2(x, ids, r.group_ep, r.size, r.rank, E, expert_scales=w)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.npu.npu_moe_distribute_dispatch_v2(torch.empty(x.shape, dtype=x.dtype), ids.cpu(),
                                                            r.group_ep, r.size, r.rank, E)
    return tuple(real[6].shape), tuple(fake[6].shape), tuple(given[6].shape)
