"""Operator attributes and the quantities derived from them (docs/README.md, docs/dispatch.md, docs/errors.md).

Notation (docs/README.md):
    W  ep_world_size            S  shared_expert_rank_num     N_s shared_expert_num (after the
    E  moe_expert_num           L  E / (W - S) MoE experts per MoE rank      1 -> 0 rewrite)
    R  S / N_s replicas         K  top-k                      H  hidden size
    G  global_bs or Bs*W        maxBs = G / W                 tp tp_world_size (active iff 2)
    A  rows one rank may receive: shared maxBs*ceil(W/R), MoE G*min(L, K)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MoeConfig:
    """Attributes that every rank of one call must agree on (as passed by the user)."""

    ep_world_size: int
    moe_expert_num: int
    tp_world_size: int = 0
    expert_shard_type: int = 0
    shared_expert_num: int = 1
    shared_expert_rank_num: int = 0
    quant_mode: int = 0
    global_bs: int = 0
    expert_token_nums_type: int = 1
    comm_quant_mode: int = 0
    zero_expert_num: int = 0
    copy_expert_num: int = 0
    const_expert_num: int = 0

    @property
    def shared_num(self) -> int:
        """N_s after the rewrite "S == 0 and N_s == 1 => N_s = 0" (both tilings)."""
        if self.shared_expert_rank_num == 0 and self.shared_expert_num == 1:
            return 0
        return self.shared_expert_num

    @property
    def special_num(self) -> int:
        return self.zero_expert_num + self.copy_expert_num + self.const_expert_num


@dataclass(frozen=True)
class Geometry:
    """Derived sizes of one EP domain for one call (valid attributes assumed)."""

    W: int
    S: int
    Ns: int
    E: int
    K: int
    H: int
    G: int
    tp: int
    zero: int = 0
    copy: int = 0
    const: int = 0

    @classmethod
    def of(cls, cfg: MoeConfig, bs: int, k: int, h: int) -> "Geometry":
        W = cfg.ep_world_size
        return cls(W=W, S=cfg.shared_expert_rank_num, Ns=cfg.shared_num, E=cfg.moe_expert_num,
                   K=k, H=h, G=cfg.global_bs or bs * W, tp=cfg.tp_world_size,
                   zero=cfg.zero_expert_num, copy=cfg.copy_expert_num, const=cfg.const_expert_num)

    @property
    def L(self) -> int:
        return self.E // (self.W - self.S)

    @property
    def R(self) -> int:
        return self.S // self.Ns if self.Ns else 0

    @property
    def max_bs(self) -> int:
        return self.G // self.W

    @property
    def tp_active(self) -> bool:
        return self.tp == 2

    @property
    def special(self) -> int:
        return self.zero + self.copy + self.const

    @property
    def a_shared(self) -> int:
        return self.max_bs * math.ceil(self.W / self.R) if self.R else 0

    @property
    def a_moe(self) -> int:
        return self.G * min(self.L, self.K)

    def is_shared(self, rank: int) -> bool:
        return rank < self.S

    def capacity(self, rank: int) -> int:
        """A: rows ``rank`` may receive from the EP domain."""
        return self.a_shared if self.is_shared(rank) else self.a_moe

    def local_expert_num(self, rank: int) -> int:
        return 1 if self.is_shared(rank) else self.L

    def recv_blocks(self, rank: int) -> int:
        """Entries of epRecvCounts written for ``rank``: W (shared) or W*L (MoE)."""
        return self.W * self.local_expert_num(rank)
