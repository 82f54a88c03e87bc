"""A Megatron-style all-to-all token dispatcher, the pattern a user would hand-write.

This is our own implementation of the pattern of megatron-core's MoEAlltoAllTokenDispatcher
(megatron-core itself needs CUDA for its dispatcher), the benchmark's baseline (:mod:`emu.bench.suite`):

dispatch: permute token copies by expert (stable sort of the routing map) -> all-to-all of
          per-expert counts -> all-to-all-v of the permuted tokens -> (tp 2) all-gather-v over
          TP -> sort the received chunks from (source, local expert) to (local expert, source).
combine:  the reverse: unsort chunks -> (tp 2) reduce-scatter -> all-to-all-v back ->
          unpermute: weight by the routing probabilities and scatter-add into (Bs, H) in fp32.
No shared experts, no quantisation: bf16/fp16 tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Routing:
    """State one dispatch leaves for its combine."""

    sorted_idx: torch.Tensor       # (Bs*K,) token copy order, expert-major
    send_splits: list[int]
    recv_splits: list[int]
    chunk_order: torch.Tensor      # received row -> local-expert-major row
    tp_sizes: list[int] | None


class MegatronStyleDispatcher:
    def __init__(self, ep_group, num_experts: int, tp_group=None):
        self.ep_group, self.tp_group = ep_group, tp_group
        self.ep = dist.get_world_size(ep_group)
        self.E = num_experts
        self.L = num_experts // self.ep
        self.collectives = 0

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        bs, k = topk_ids.shape
        flat = topk_ids.reshape(-1).to(torch.int64)
        sorted_idx = torch.argsort(flat, stable=True)
        permuted = x.index_select(0, sorted_idx // k)                       # (Bs*K, H), expert-major
        per_expert = torch.bincount(flat, minlength=self.E)
        recv_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_per_expert, per_expert, group=self.ep_group)   # counts
        self.collectives += 1
        send_splits = per_expert.view(self.ep, self.L).sum(1).tolist()
        recv_counts = recv_per_expert.view(self.ep, self.L)                  # [source, local expert]
        recv_splits = recv_counts.sum(1).tolist()
        out = torch.empty(sum(recv_splits), x.shape[1], dtype=x.dtype)
        dist.all_to_all_single(out, permuted, recv_splits, send_splits, group=self.ep_group)
        self.collectives += 1
        tp_sizes = None
        if self.tp_group is not None:
            out, recv_counts, tp_sizes = self._tp_all_gather(out, recv_counts)
        # sort chunks (source, local expert) -> (local expert, source)
        starts = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
        chunks = [torch.arange(int(starts[s * self.L + l]), int(starts[s * self.L + l] + recv_counts[s, l]))
                  for l in range(self.L) for s in range(recv_counts.shape[0])]
        chunk_order = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
        return out.index_select(0, chunk_order), Routing(sorted_idx, send_splits, recv_splits, chunk_order, tp_sizes)

    def _tp_all_gather(self, rows: torch.Tensor, recv_counts: torch.Tensor):
        n = torch.tensor([rows.shape[0]])
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        dist.all_gather(sizes, n, group=self.tp_group)
        sizes = [int(s) for s in sizes]
        pad = torch.zeros(max(sizes), rows.shape[1], dtype=rows.dtype)
        pad[:rows.shape[0]] = rows
        bufs = [torch.empty_like(pad) for _ in range(2)]
        dist.all_gather(bufs, pad, group=self.tp_group)
        counts = [torch.empty_like(recv_counts) for _ in range(2)]
        dist.all_gather(counts, recv_counts.contiguous(), group=self.tp_group)
        self.collectives += 3
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)]), torch.cat(counts), sizes

    def combine(self, y: torch.Tensor, probs: torch.Tensor, r: Routing, bs: int) -> torch.Tensor:
        unsorted = torch.empty_like(y)
        unsorted[r.chunk_order] = y
        if r.tp_sizes is not None:
            me = dist.get_rank(self.tp_group)
            parts = list(unsorted.split(r.tp_sizes))
            # gloo has no reduce_scatter: all-to-all the halves, then add
            out_halves = [torch.empty(r.tp_sizes[me], y.shape[1], dtype=y.dtype) for _ in range(2)]
            dist.all_to_all(out_halves, [p.contiguous() for p in parts], group=self.tp_group)
            self.collectives += 1
            unsorted = (out_halves[0].float() + out_halves[1].float()).to(y.dtype)
        back = torch.empty(sum(r.send_splits), y.shape[1], dtype=y.dtype)
        dist.all_to_all_single(back, unsorted, r.send_splits, r.recv_splits, group=self.ep_group)
        self.collectives += 1
        k = probs.shape[1]
        weighted = back.float() * probs.reshape(-1)[r.sorted_idx][:, None]
        out = torch.zeros(bs, y.shape[1], dtype=torch.float32)
        out.index_add_(0, r.sorted_idx // k, weighted)
        return out.to(y.dtype)
