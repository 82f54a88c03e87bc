"""mc2-emu: a multi-process CPU emulator of Huawei CANN's MoE dispatch / combine (V1, V2/V3).

Public API (torch_npu names, docs/dispatch.md)::

    emu.moe_distribute_dispatch_v2(...)  -> 7-tuple
    emu.moe_distribute_combine_v2(...)   -> x_out
    emu.moe_distribute_dispatch(...) / emu.moe_distribute_combine(...)   (V1)
    emu.moe_distribute_combine_add_rms_norm(...) -> (y, rstd, x)   combine + residual + RMSNorm (A3)
    emu.group_name(pg)                   -> the group's name string (groupEp / groupTp)
    emu.AclnnError                       -> RuntimeError with .code 161001 / 161002 / 561002
    emu.ErrorKind                        -> .kind of every emulator error (with .culprits)
    emu.enable_trace(dir) / emu.disable_trace() / emu.mark(label)
    emu.watch(strict=False) / emu.unwatch()   every collective of the job in one sequence per group
    emu.set_jitter(ms, seed)                  random delays before each collective (EMU_JITTER_MS)

The package layout is the architecture (README, "Architecture"): ``core`` (rules and
numerics), ``debug`` (trace records, flight recorder, report), ``comm`` (one call's
communication), ``a3`` / ``a2`` (each chip), ``reference`` (single-process references),
``chips`` and ``api`` (the entry points), ``testing`` (scenarios), ``npu`` (torch_npu face).
"""
from .api import (moe_distribute_combine, moe_distribute_combine_add_rms_norm, moe_distribute_combine_v2,
                  moe_distribute_dispatch, moe_distribute_dispatch_v2)
from .comm.context import disable_trace, enable_trace, mark
from .comm.groups import group_name
from .comm.watching import set_jitter, unwatch, watch, watch_from_env
from .core.errors import (PARAM_INVALID, PARAM_NULLPTR, TILING_ERROR, AclnnError, CollectiveError, EmuError,
                          ErrorKind, PeerError)

__all__ = ["moe_distribute_dispatch_v2", "moe_distribute_combine_v2", "moe_distribute_dispatch",
           "moe_distribute_combine", "moe_distribute_combine_add_rms_norm", "group_name", "AclnnError", "PeerError",
           "CollectiveError", "EmuError", "ErrorKind", "PARAM_NULLPTR", "PARAM_INVALID", "TILING_ERROR",
           "enable_trace", "disable_trace", "watch", "unwatch", "set_jitter", "mark"]
__version__ = "0.2.0"

watch_from_env()                 # EMU_WATCH / EMU_JITTER_MS: wrap torch.distributed's collectives now
