"""mc2-emu: a multi-process CPU emulator of Huawei CANN's MoE dispatch / combine (V2/V3).

Public API (torch_npu names, spec §14)::

    emu.moe_distribute_dispatch_v2(...)  -> 7-tuple
    emu.moe_distribute_combine_v2(...)   -> x_out
    emu.group_name(pg)                   -> the group's name string (groupEp / groupTp)
    emu.AclnnError                       -> RuntimeError with .code 161001 / 161002 / 561002
"""
from .api import moe_distribute_combine_v2, moe_distribute_dispatch_v2
from .errors import PARAM_INVALID, PARAM_NULLPTR, TILING_ERROR, AclnnError, PeerError
from .groups import group_name

__all__ = ["moe_distribute_dispatch_v2", "moe_distribute_combine_v2", "group_name", "AclnnError",
           "PeerError", "PARAM_NULLPTR", "PARAM_INVALID", "TILING_ERROR"]
__version__ = "0.1.0"
