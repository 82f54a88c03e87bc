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

Storage (:class:`NpuStorage`): ``t.untyped_storage()`` is an npu storage standing for the inner
CPU storage: its size, ``data_ptr()`` and ``resize_()`` are the inner storage's, so
``t.untyped_storage().resize_(0)`` frees the memory (later reads raise, as on the device) and every
view of that memory sees it; views share one storage object.  It is a storage of its own, not the
inner one, so graph capture, which fakeifies the npu tensor and its inner CPU tensor separately,
never takes the two for aliases.

Processes: once installed, ``torch.multiprocessing`` (any start method) passes npu tensors as it
passes CPU tensors: the inner CPU tensor goes through torch's own reduction (shared memory), and
the receiving process gets an npu tensor on the same device index over that memory (so in-place
writes are seen on both sides); unpickling installs the drop-in in a process that has not.
``pickle`` and ``torch.save`` copy, as torch saves storage-less privateuse1 tensors: the loaded
tensor is ``cpu_copy.to("npu:i")`` (``torch.load``'s ``weights_only`` accepts it; loading needs
the drop-in installed).

Not supported: ``.numpy()`` (as on the device: ``.cpu()`` first), pinned memory, storage methods
beyond those :class:`NpuStorage` defines.  Mixing npu and CPU tensors in one op is allowed (the
device refuses it).
"""
from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.hooks import warn_if_has_hooks

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
        _check_memory(self)
        text = repr(self.inner.detach())
        return f"{text[:-1]}, device='{self.device}')"

    def tolist(self) -> Any:
        _check_memory(self)
        return self.inner.tolist()

    def data_ptr(self) -> int:
        return self.inner.data_ptr()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. "
                        "Use Tensor.cpu() to copy the tensor to host memory first.")

    @torch.compiler.disable
    def untyped_storage(self) -> NpuStorage:
        """The npu storage of this tensor's memory: one object for every npu tensor (view) over the
        same inner CPU storage on this device, kept alive by each npu tensor that handed it out
        (as a view keeps its storage alive).  Compiled code runs it eagerly (a graph break): storage
        objects are not traceable."""
        inner = self.inner.untyped_storage()
        key = (inner._cdata, self.device.index)
        storage = _STORAGES.get(key)
        if storage is None:
            storage = _STORAGES[key] = _new_storage(inner, self.device.index)
        self._npu_storage = storage
        return storage

    def _typed_storage(self) -> torch.TypedStorage:
        """``t.storage()``: the typed view of :meth:`untyped_storage`."""
        return torch.TypedStorage(wrap_storage=self.untyped_storage(), dtype=self.dtype, _internal=True)

    def record_stream(self, stream: Any) -> None:
        """Accepted and ignored: every CPU op has finished when it returns, so no stream can still be using
        the memory when it is freed."""

    def __reduce_ex__(self, protocol: int) -> tuple[Callable, tuple]:
        """``pickle`` / ``torch.save``: a copy, rebuilt as torch rebuilds storage-less privateuse1 tensors
        (``cpu.to(dtype, "npu:i")``, which ``torch.load(weights_only=True)`` accepts); a parameter stays one.
        Between processes, :func:`reduce_npu_tensor` shares the memory instead."""
        _check_memory(self)
        if getattr(self, "_is_param", False):
            return torch._utils._rebuild_parameter, (self.detach(), self.requires_grad, {})
        return torch._utils._rebuild_device_tensor_from_cpu_tensor, (
            self.inner.detach(), self.dtype, str(self.device), self.requires_grad)

    def __deepcopy__(self, memo: dict) -> NpuTensor:
        """A copy of the memory on the same device, with the tensor's attributes and gradient (torch's
        default deep-copies the storage, which an npu storage cannot allocate)."""
        if not self.is_leaf:
            raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) support the deepcopy "
                               "protocol at the moment.")
        if id(self) in memo:
            return memo[id(self)]
        _check_memory(self)
        with torch.no_grad():
            new = NpuTensor(self.inner.clone(memory_format=torch.preserve_format), self.device.index)
        new.requires_grad_(self.requires_grad)
        memo[id(self)] = new
        for name, value in vars(self).items():
            if name not in ("inner", "_npu_storage"):
                setattr(new, name, copy.deepcopy(value, memo))
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        return new

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen: dict[int, torch.Tensor] = {}
        index = _unwrap_into(seen, args, kwargs)
        if _reads_memory(func):
            for a in seen.values():
                if isinstance(a, NpuTensor):
                    _check_memory(a)
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


def _check_memory(t: NpuTensor) -> None:
    """Raise if ``t`` reaches past its memory, as after ``t.untyped_storage().resize_(0)`` (the device fails
    such an access; the CPU kernel would read freed memory).  Traced (fake, functional) inner tensors have
    no memory to check."""
    inner = t.inner
    if type(inner) is not torch.Tensor:
        return
    have, size = inner.untyped_storage().nbytes(), inner.element_size()
    if have >= (inner.storage_offset() + inner.numel()) * size and inner.is_contiguous() or inner.numel() == 0:
        return                                                  # the common case, without the sum below
    need = (inner.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(inner.shape, inner.stride()))) * size
    if have < need:
        raise RuntimeError(f"mc2-emu: an {t.device} tensor of shape {tuple(t.shape)} needs {need} bytes of memory "
                           f"but its storage has {have}: its memory was released (untyped_storage().resize_())")


#: aten ops that see an npu tensor's metadata, not its memory (views are too: ``func.is_view``); every other
#: op on an npu tensor whose memory was released raises.
_METADATA_ONLY = {
    torch.ops.aten.set_.source_Storage, torch.ops.aten.set_.source_Storage_storage_offset,
    torch.ops.aten.set_.source_Tensor, torch.ops.aten.set_.default, torch.ops.aten.resize_.default,
    torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
}
_READS: dict[Any, bool] = {}


def _reads_memory(func) -> bool:
    """Whether ``func`` touches its npu arguments' memory (so is checked by :func:`_check_memory`)."""
    hit = _READS.get(func)
    if hit is None:
        hit = _READS[func] = not (getattr(func, "is_view", False) or func in _METADATA_ONLY)
    return hit


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
    if isinstance(a, NpuStorage):
        return a.inner                      # e.g. t.set_(storage), as graph capture and torch._utils rebuild
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


class NpuStorage(torch.UntypedStorage):
    """``t.untyped_storage()`` of an npu tensor: a storage on ``npu:i`` (a real storage object to torch, which
    compares storages by identity) that stands for the inner CPU storage ``inner``.  Size, ``data_ptr()``,
    ``resize_()``, copies and element access are the inner storage's; ``resize_(0)`` releases the memory
    and every npu tensor over it then raises when read, as on the device.  Passed to an op
    (``t.set_(storage)``), it is the inner storage.  Methods not defined here are torch's and raise
    "invalid python storage"."""

    inner: torch.UntypedStorage

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def size(self) -> int:
        return self.inner.nbytes()

    def __len__(self) -> int:
        return self.inner.nbytes()

    def data_ptr(self) -> int:
        return self.inner.data_ptr()

    def resizable(self) -> bool:
        return self.inner.resizable()

    def resize_(self, size: int) -> NpuStorage:
        """Resizes the memory (0: frees it; back to its size: fresh, uninitialised memory)."""
        self.inner.resize_(size)
        return self

    def is_shared(self) -> bool:
        return self.inner.is_shared()

    def copy_(self, source: torch.UntypedStorage, non_blocking: bool | None = None) -> NpuStorage:
        self.inner.copy_(source.inner if isinstance(source, NpuStorage) else source)
        return self

    def fill_(self, value: int) -> NpuStorage:
        self.inner.fill_(value)
        return self

    def clone(self) -> NpuStorage:
        """A copy of the memory on the same device (also what ``copy.copy`` / ``copy.deepcopy`` give)."""
        return _new_storage(self.inner.clone(), self.device.index)

    def cpu(self) -> torch.UntypedStorage:
        """A CPU copy, as ``.cpu()`` of a device storage."""
        return self.inner.clone()

    def tolist(self) -> list[int]:
        return self.inner.tolist()

    def __getitem__(self, index: Any) -> Any:
        return self.inner[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self.inner[index] = value

    def __repr__(self) -> str:
        return f"{str(self.inner).rsplit('[', 1)[0]}[{torch.typename(self)}(device={self.device}) of size {len(self)}]"

    def __reduce__(self) -> tuple[Callable, tuple]:
        """Pickled as a byte tensor over its inner storage (shared between processes, copied by ``pickle``,
        which cannot pickle a bare CPU storage) and its device index."""
        return rebuild_npu_storage, (torch.empty(0, dtype=torch.uint8).set_(self.inner), self.device.index)


#: The npu storage of each (inner storage, device index) while some npu tensor or caller holds it.
_STORAGES: weakref.WeakValueDictionary[tuple[int, int], NpuStorage] = weakref.WeakValueDictionary()


def _new_storage(inner: torch.UntypedStorage, index: int) -> NpuStorage:
    """A new npu storage for ``inner``: the storage object of an empty wrapper on ``npu:index``, made an
    :class:`NpuStorage` (its own object owns it: torch needs a real storage, for identity and to accept
    it as an argument, and a Python-registered device cannot allocate one)."""
    holder = torch.Tensor._make_wrapper_subclass(NpuTensor, (0,), dtype=torch.uint8,
                                                 device=torch.device(NPU, index), storage_size=inner.nbytes())
    storage = torch.Tensor.untyped_storage(holder)
    storage.__class__ = NpuStorage
    storage.inner = inner
    return storage


def _install() -> None:
    """Install the drop-in (idempotent).  emu.npu imports this module (through device), so it is looked up
    when called, by which time the package is fully imported, rather than imported here (a circle)."""
    sys.modules[__package__].install()


def rebuild_npu_tensor(inner: torch.Tensor, index: int, requires_grad: bool, is_param: bool) -> torch.Tensor:
    """The npu tensor another process sent (:func:`reduce_npu_tensor`): over the memory ``inner`` (shared
    when it came through torch.multiprocessing), on ``npu:index``.  Installs the drop-in first, since a
    spawned child may receive npu tensors before (or without) importing torch_npu."""
    _install()
    t = NpuTensor(inner, index)
    if is_param:
        return torch.nn.Parameter(t, requires_grad)
    return t.requires_grad_(requires_grad)


def reduce_npu_tensor(t: NpuTensor) -> tuple[Callable, tuple]:
    """How ``multiprocessing`` (``ForkingPickler``) sends an npu tensor: its inner CPU tensor, which torch's
    own reduction puts in shared memory (as for CPU tensors), with the device index; refused, like CPU
    tensors, when it is a non-leaf requiring grad."""
    if t.requires_grad and not t.is_leaf:
        raise RuntimeError("Cowardly refusing to serialize non-leaf tensor which requires_grad, since autograd "
                           "does not support crossing process boundaries.  If you just want to transfer the data, "
                           "call detach() on the tensor before serializing (e.g., putting it on the queue).")
    warn_if_has_hooks(t)
    return rebuild_npu_tensor, (t.inner.detach(), t.device.index, t.requires_grad, getattr(t, "_is_param", False))


def rebuild_npu_storage(memory: torch.Tensor, index: int) -> NpuStorage:
    """An npu storage another process sent or ``pickle`` saved (:meth:`NpuStorage.__reduce__`): over the
    storage of the byte tensor ``memory``."""
    _install()
    return _new_storage(memory.untyped_storage(), index)


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
    for t in (src, dst):
        if isinstance(t, NpuTensor):
            _check_memory(t)
    dst.inner.copy_(src.inner if isinstance(src, NpuTensor) else src)
    return dst


_LIBRARY: list[torch.library.Library] = []


def register_factories() -> None:
    """aten::empty / empty_strided / _copy_from on the npu key, where every factory function
    and ``.to("npu")`` allocate, ``torch.Generator`` that accepts npu, and how multiprocessing
    sends npu tensors (once per process)."""
    if _LIBRARY:
        return
    torch.Generator = Generator
    ForkingPickler.register(NpuTensor, reduce_npu_tensor)
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("empty.memory_format", _empty, "PrivateUse1")
    lib.impl("empty_strided", _empty_strided, "PrivateUse1")
    lib.impl("_copy_from", _copy_from, "PrivateUse1")
    _LIBRARY.append(lib)
