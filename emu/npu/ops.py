"""The ``torch_npu`` module's operators: ``torch_npu.X`` is the dispatcher op ``torch.ops.npu.X``
(:mod:`emu.npu.registry`), for CPU and npu tensors alike (an npu call returns npu tensors on the
same device).  The MC2 operators, ``_npu_distribute_barrier``, the MoE routing operators, the
compute operators around them (grouped matmul, swiglu, dequant-swiglu-quant, token permute and
unpermute, dynamic quant) and the format helpers.  Any other ``npu_*`` name raises a clear
"not emulated" error when called.
"""
from __future__ import annotations

from collections.abc import Callable

from .registry import packets

#: torch_npu's name -> its op (``torch.ops.npu.<name>``).
EXPORTS: dict[str, Callable] = packets()
globals().update(EXPORTS)


class NotEmulated(AttributeError, NotImplementedError):
    """A torch_npu name mc2-emu does not provide (``hasattr`` sees False)."""


def _not_emulated(name: str) -> str:
    return (f"torch_npu.{name} is not emulated by mc2-emu (emulated: "
            f"{', '.join(sorted(n for n in EXPORTS if n.startswith('npu_')))})")


def __getattr__(name: str):
    """``npu_*`` names resolve to a stub that raises when called (libraries import many of them
    at load time, e.g. ``from torch_npu import npu_fusion_attention``); others raise at once."""
    if name.startswith("npu_"):
        def stub(*args, **kwargs):
            raise NotEmulated(_not_emulated(name))
        stub.__name__ = name
        stub.__doc__ = _not_emulated(name)
        return stub
    raise NotEmulated(_not_emulated(name))
