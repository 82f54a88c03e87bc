"""Drop-in torch_npu on the CPU: unmodified MC2 client code runs on mc2-emu.

    import emu.npu; emu.npu.install()        # or: torchrun ... -m emu.npu.run script.py args

``install()`` (idempotent):

* registers ``npu`` as PyTorch's privateuse1 device with Python hooks, a device guard, a device
  module, and npu tensors whose memory is on the CPU (:mod:`emu.npu.tensor`: ``.npu()``,
  ``.to("npu")``, ``device="npu:i"`` factories, every aten op and collective);
* makes ``torch.npu`` that module (:mod:`emu.npu.device`: the chosen SoC's device name, SoC
  version and device count, ``set_device``, the npu random stream, ``Stream``, ``Event``:
  honest no-ops on the CPU) and ``torch.Generator`` accept ``device="npu"``;
* makes ``"hccl"`` a torch.distributed backend name run by gloo, whose groups answer
  ``get_hccl_comm_name(rank)`` with ``emu.group_name(pg)`` (:mod:`emu.npu.hccl`), as groups made
  with ``"cpu:gloo,npu:gloo"`` do;
* puts a ``torch_npu`` module in ``sys.modules`` whose operators are dispatcher ops in the
  ``npu`` namespace with torch_npu 2.14.0's schemas (``torch_npu.X is torch.ops.npu.X``,
  :mod:`emu.npu.registry`): the MC2 operators (V2 and V1) run by mc2-emu, the MoE routing
  operators (:mod:`emu.npu.routing`) and the compute operators a MoE layer calls around them
  (:mod:`emu.npu.compute`), each with a fake kernel for graph capture; any other ``npu_*`` name
  raises a clear "not emulated" error when called; ``torch_npu.testing`` as operator tests use
  it (:mod:`emu.npu.optest`); torch_npu's own dtype names (``torch_npu.hifloat8``, ``int4``, ...:
  int codes, :mod:`emu.npu.dtypes`).
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import torch

from . import device, dtypes, hccl, ops, optest


class _NotEmulatedClass:
    """Stands for a torch_npu class mc2-emu does not provide: importable, fails when used."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is not emulated by mc2-emu")


def _submodules(tnpu: types.ModuleType) -> None:
    """Submodules clients import at load time: ``torch_npu._C._distributed_c10d`` (HCCL
    process-group classes: importable, not usable) and ``torch_npu.contrib`` (empty)."""
    c = types.ModuleType("torch_npu._C")
    c10d = types.ModuleType("torch_npu._C._distributed_c10d")
    for name in ("ProcessGroupHCCL", "ProcessGroupLCCL"):
        setattr(c10d, name, type(name, (_NotEmulatedClass,), {}))
    c._distributed_c10d = c10d
    contrib = types.ModuleType("torch_npu.contrib")
    tnpu._C, tnpu.contrib = c, contrib
    for m in (c, c10d, contrib):
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
        sys.modules[m.__name__] = m


def install() -> types.ModuleType:
    """Install the npu device, ``torch.npu`` and ``torch_npu``; returns the torch_npu module."""
    if getattr(sys.modules.get("torch_npu"), "__mc2_emu__", False):
        return sys.modules["torch_npu"]
    module = device.make_device_module()
    device.register(module)
    module.__spec__ = importlib.machinery.ModuleSpec("torch.npu", None)
    sys.modules["torch.npu"] = module
    torch.npu = module
    hccl.register()
    tnpu = types.ModuleType("torch_npu", ops.__doc__)
    for name, fn in ops.EXPORTS.items():
        setattr(tnpu, name, fn)
    tnpu.__getattr__ = ops.__getattr__
    dtypes.attach(tnpu)                     # torch_npu.hifloat8, float4_e2m1fn_x2, ... (int codes)
    tnpu.npu = module
    tnpu.__version__ = "2.14.0+mc2emu"
    tnpu.__mc2_emu__ = True
    tnpu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    tnpu.__path__ = []                      # a package, so "torch_npu.x" submodule imports resolve
    sys.modules["torch_npu"] = tnpu
    sys.modules["torch_npu.npu"] = module
    _submodules(tnpu)
    optest.install(tnpu)
    return tnpu
