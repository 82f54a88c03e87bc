"""``"hccl"`` as a torch.distributed backend name, run by gloo on the CPU.

``init_process_group("hccl")`` and ``new_group(backend="hccl")`` create gloo process groups
(for the cpu and npu devices alike: npu tensors reach gloo as their CPU memory, see
:mod:`emu.npu.tensor`), with the timeout the caller gave.  Their backends answer
``get_hccl_comm_name(rank)`` with the group's name (what the MC2 operators take as
``group_ep`` / ``group_tp``), as groups made with ``"cpu:gloo,npu:gloo"`` do.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..comm.domain import timeout_s
from ..comm.groups import group_name, group_ranks, own_group, resolve_group

BACKEND = "hccl"


def _gloo(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroupGloo:
    """The backend object behind an "hccl" group: gloo over the group's store."""
    pg = dist.ProcessGroupGloo(store, rank, size, timeout)
    pg._set_sequence_number_for_group()
    return pg


def hccl_comm_name(backend, rank: int = 0) -> str:
    """``pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)`` -> the group's name."""
    for pg in list(c10d._world.pg_map):
        for dev in ("npu", "cpu"):
            try:
                if pg._get_backend(torch.device(dev)) is backend:
                    return group_name(pg)
            except RuntimeError:
                continue
    raise RuntimeError("mc2-emu: get_hccl_comm_name: this backend belongs to no known process group")


def register() -> None:
    """Make "hccl" a backend name (for cpu and npu), and gloo backends answer
    ``get_hccl_comm_name``."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _gloo, devices=["cpu", "npu"])
    dist.ProcessGroupGloo.get_hccl_comm_name = hccl_comm_name
    dist.is_hccl_available = lambda: True


def distribute_barrier(x_ref: torch.Tensor, group: str, world_size: int, *, time_out: torch.Tensor | None = None,
                       elastic_info: torch.Tensor | None = None) -> torch.Tensor:
    """torch_npu._npu_distribute_barrier: every rank of ``group`` (a comm name) waits for the
    others (at most EMU_TIMEOUT_S); returns ``x_ref``'s values (op-plugin's kernel returns ``x_ref``
    itself; a copy here, as the schema declares a new tensor)."""
    pg = resolve_group(group)
    if pg is None:
        raise RuntimeError(f"mc2-emu: _npu_distribute_barrier: no process group is named {group!r}")
    if dist.get_world_size(pg) != world_size:
        raise RuntimeError(f"mc2-emu: _npu_distribute_barrier: world_size={world_size} but group {group!r} "
                           f"has {dist.get_world_size(pg)} ranks")
    own_group(group_ranks(pg), timeout_s(), "barrier").pg.barrier().wait()     # gives up after EMU_TIMEOUT_S
    return x_ref.clone()
