"""The one registry of mc2-emu's torch_npu operators.

Each schema of :mod:`emu.npu.schemas` (torch_npu 2.14.0's, as released) becomes a real
dispatcher op ``npu::<name>`` with

* its kernel for CPU tensors (npu tensors reach it through :class:`emu.npu.tensor.NpuTensor`'s
  ``__torch_dispatch__``, which runs the op on their CPU memory and returns npu tensors), and
* its fake kernel (shapes and dtypes only), which FakeTensorMode, meta tensors and graph
  capture (``torch.compile``) use, as torch_npu's meta functions are used.

``torch_npu.X`` is ``torch.ops.npu.X`` (the same op overload packet), as in torch_npu, so
``torch_npu.npu_grouped_matmul(..., group_list=[...])`` picks the ``List`` overload by its
arguments the way torch_npu does.  Registration happens once per process, on first use.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import compute, formats, mc2, routing
from .schemas import SCHEMAS, op_name

NAMESPACE = "npu"
_FAMILIES = (mc2.KERNELS, routing.KERNELS, compute.KERNELS, formats.KERNELS)


@dataclass(frozen=True)
class OpEntry:
    """One dispatcher op: name with overload (``npu_grouped_matmul.List``), torch_npu 2.14's
    schema, the kernel on CPU tensors and the fake kernel."""

    name: str
    schema: str
    kernel: Callable
    fake: Callable

    @property
    def base(self) -> str:
        """The packet's name (``npu_grouped_matmul``), what torch_npu exposes."""
        return self.name.split(".", 1)[0]

    @property
    def qualified(self) -> str:
        return f"{NAMESPACE}::{self.name}"


def _entries() -> tuple[OpEntry, ...]:
    kernels = {name: pair for family in _FAMILIES for name, pair in family.items()}
    names = [op_name(s) for s in SCHEMAS]
    missing, extra = set(names) - set(kernels), set(kernels) - set(names)
    if missing or extra:
        raise RuntimeError(f"mc2-emu: the registry's kernels and schemas differ: no kernel for {sorted(missing)}, "
                           f"no schema for {sorted(extra)}")
    return tuple(OpEntry(op_name(s), s, *kernels[op_name(s)]) for s in SCHEMAS)


ENTRIES: tuple[OpEntry, ...] = _entries()
_LIBRARY: list[torch.library.Library] = []


def register() -> None:
    """Define every op in the ``npu`` namespace with its kernel and fake kernel (once per process)."""
    if _LIBRARY:
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for e in ENTRIES:
        lib.define(e.schema)
        lib.impl(e.name, e.kernel, "CPU")
        torch.library.register_fake(e.qualified, e.fake, lib=lib)
    _LIBRARY.append(lib)


def packets() -> dict[str, torch._ops.OpOverloadPacket]:
    """torch_npu's names -> ``torch.ops.npu.<name>`` (registered first)."""
    register()
    return {e.base: getattr(torch.ops.npu, e.base) for e in ENTRIES}
