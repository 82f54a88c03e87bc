"""``npu`` tensors on the CPU: what ``.npu()``, ``.to("npu")`` and ``device="npu"`` return.

An :class:`NpuTensor` is a wrapper subclass: it reports ``device npu:N``, and holds an ordinary
CPU tensor (``.inner``) that owns the memory.  Every aten op that sees one runs through
:meth:`NpuTensor.__torch_dispatch__`: the arguments are unwrapped, the CPU kernel runs, and
the tensors it returns are wrapped again on the inputs' device (an op that writes into an
argument returns that argument).  So every torch op works, autograd included, with no kernel
written per op; the c10d collectives reach gloo with the inner CPU tensors the same way.

Factory functions (``torch.zeros(..., device="npu:1")``, ``.to("npu")``, ``torch.randn``)
end in ``aten::empty`` / ``aten::empty_strided`` on the ``npu`` (privateuse1) key, which
:func:`register_factories` implements.  Random ops on npu tensors draw from the npu
generator (``torch.npu.manual_seed``), not from the CPU's, as on the device.  Where the NPU's
kernel takes what the CPU's refuses (``torch.histc`` of integer tensors), npu tensors get the
NPU's behaviour (``_NPU_SEMANTICS``).

npu tensors are traceable (``__tensor_flatten__`` / ``__tensor_unflatten__``): ``torch.compile``
captures graphs over them, with Dynamo and AOTAutograd tracing the inner CPU tensors.

Not supported: ``.numpy()`` (as on the device: ``.cpu()`` first), storage-level APIs
(``untyped_storage()``, sharing npu tensors between processes, ``torch.save`` of npu tensors),
pinned memory.  Mixing npu and CPU tensors in one op is allowed (the device refuses it).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

NPU = "npu"
_CPU = torch.device("cpu")


class NpuTensor(torch.Tensor):
    """A tensor on ``npu:index`` whose memory is the CPU tensor ``inner`` (same shape,
    strides, dtype)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, index: int = 0) -> "NpuTensor":
        # The wrapper's storage is as large as the memory it stands for; an empty one claims one byte,
        # since graph capture resizes a zero-byte storage, which a Python-registered device cannot do.
        t = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=torch.device(NPU, index), requires_grad=inner.requires_grad,
            storage_size=inner.untyped_storage().nbytes() or 1)
        t.inner = inner
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __tensor_flatten__(self) -> tuple[list[str], int]:
        """Graph capture (Dynamo / AOTAutograd) traces the inner CPU tensor; the device index rides along."""
        return ["inner"], self.device.index

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], index: int, outer_size, outer_stride) -> "NpuTensor":
        return NpuTensor(inner["inner"], index)

    def _stable_hash_for_caching(self) -> str:
        """AOTAutograd's cache key of the subclass: what is not in the inner tensor (the device)."""
        return f"NpuTensor:{self.device.index}"

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        text = repr(self.inner.detach())
        return f"{text[:-1]}, device='{self.device}')"

    def tolist(self) -> Any:
        return self.inner.tolist()

    def data_ptr(self) -> int:
        return self.inner.data_ptr()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. "
                        "Use Tensor.cpu() to copy the tensor to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen: dict[int, torch.Tensor] = {}
        index = _unwrap_into(seen, args, kwargs)
        target = kwargs.get("device")
        cpu_args, cpu_kwargs = tree_map(_to_cpu_arg, args), tree_map(_to_cpu_arg, kwargs)
        if _is_random(func) and cpu_kwargs.get("generator") is None:
            cpu_kwargs["generator"] = npu_generator()
        out = _NPU_SEMANTICS.get(func, func)(*cpu_args, **cpu_kwargs)
        if target is not None and torch.device(target).type != NPU:
            return out                                      # e.g. .cpu(), .to("cpu")
        if target is not None and index is None:
            index = _index(torch.device(target))
        return tree_map(lambda o: _rewrap(o, seen, index or 0), out)


def _histc(self: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:
    """The NPU's histc (aclnnHistc) takes integer tensors too, counting in their dtype; the CPU
    kernel takes floating ones only.  Integers are binned as float64 (exact), as the CPU bins floats."""
    if self.is_floating_point():
        return torch.ops.aten.histc.default(self, bins, min, max)
    return torch.ops.aten.histc.default(self.double(), bins, min, max).to(self.dtype)


def _histc_out(self: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0, *,
               out: torch.Tensor) -> torch.Tensor:
    return out.copy_(_histc(self, bins, min, max))


#: aten ops whose NPU kernel accepts what the CPU kernel refuses, run on npu tensors the NPU's way
#: (docs/graph-mode.md, "npu tensors").
_NPU_SEMANTICS: dict[Any, Callable] = {
    torch.ops.aten.histc.default: _histc,
    torch.ops.aten.histc.out: _histc_out,
}


def _unwrap_into(seen: dict[int, torch.Tensor], args, kwargs) -> int | None:
    """Record every tensor argument by the CPU tensor an op sees (an NpuTensor's inner one),
    so that an output which is an argument comes back as that argument; returns the first
    NpuTensor's index (None: there is none)."""
    index = None

    def note(a):
        nonlocal index
        if isinstance(a, NpuTensor):
            seen[id(a.inner)] = a
            if index is None:
                index = a.device.index
        elif isinstance(a, torch.Tensor):
            seen[id(a)] = a                  # e.g. cpu.copy_(npu) returns the CPU tensor
        return a

    tree_map(note, (args, kwargs))
    return index


def _to_cpu_arg(a):
    if isinstance(a, NpuTensor):
        return a.inner
    if isinstance(a, torch.Tensor) and a.device.type == NPU:
        # Not an NpuTensor yet on npu: a factory's result traced under graph capture (FakeTensorMode
        # makes it without our factory kernels).  The copy is traced too; when the graph runs, the
        # factory gives an NpuTensor and the copy its CPU memory.
        return a.to(_CPU)
    if isinstance(a, torch.device) and a.type == NPU:
        return _CPU
    return a


def _rewrap(o, seen: dict[int, torch.Tensor], index: int):
    if not isinstance(o, torch.Tensor) or isinstance(o, NpuTensor):
        return o
    same = seen.get(id(o))
    return NpuTensor(o, index) if same is None else same


_RANDOM: dict[Any, bool] = {}


def _is_random(func) -> bool:
    """Ops with a ``generator`` keyword (normal_, uniform_, bernoulli, randperm, multinomial, ...)."""
    hit = _RANDOM.get(func)
    if hit is None:
        hit = _RANDOM[func] = any(a.name == "generator" and a.kwarg_only for a in func._schema.arguments)
    return hit


def _index(device: torch.device) -> int:
    """The device's index, or the current npu device for a bare "npu"."""
    if device.index is not None:
        return device.index
    return torch.npu.current_device()


_GENERATOR: list[torch.Generator] = []


def npu_generator() -> torch.Generator:
    """The npu random stream (a CPU generator of its own; ``torch.npu.manual_seed`` seeds it)."""
    if not _GENERATOR:
        _GENERATOR.append(torch.Generator())
    return _GENERATOR[0]


_TorchGenerator = torch.Generator


class _GeneratorType(type(_TorchGenerator)):
    def __instancecheck__(cls, obj) -> bool:            # generators made before install() count too
        return isinstance(obj, _TorchGenerator)


class Generator(_TorchGenerator, metaclass=_GeneratorType):
    """``torch.Generator`` once installed: ``Generator(device="npu")`` is a CPU generator
    whose ``device`` says npu (random ops on npu tensors run on the CPU); other devices as before."""

    def __new__(cls, device=None):
        wanted = torch.device(device) if device is not None else _CPU
        g = _TorchGenerator.__new__(cls, _CPU if wanted.type == NPU else wanted)
        g._npu_device = wanted if wanted.type == NPU else None
        return g

    def __init__(self, device=None):
        pass

    @property
    def device(self) -> torch.device:
        return self._npu_device or super().device


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None) -> NpuTensor:
    inner = torch.empty(size, dtype=dtype, memory_format=memory_format)
    return NpuTensor(inner, _index(torch.device(device or NPU)))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None) -> NpuTensor:
    return NpuTensor(torch.empty_strided(size, stride, dtype=dtype), _index(torch.device(device or NPU)))


def _copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """A copy into an npu tensor that bypassed Python dispatch (``torch.tensor(..., device="npu")``)."""
    dst.inner.copy_(src.inner if isinstance(src, NpuTensor) else src)
    return dst


_LIBRARY: list[torch.library.Library] = []


def register_factories() -> None:
    """aten::empty / empty_strided / _copy_from on the npu key, where every factory function
    and ``.to("npu")`` allocate, and ``torch.Generator`` that accepts npu (once per process)."""
    if _LIBRARY:
        return
    torch.Generator = Generator
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("empty.memory_format", _empty, "PrivateUse1")
    lib.impl("empty_strided", _empty_strided, "PrivateUse1")
    lib.impl("_copy_from", _copy_from, "PrivateUse1")
    _LIBRARY.append(lib)
