"""``npu`` as PyTorch's privateuse1 device, with Python hooks and a device module.

npu tensors keep their memory on the CPU (:mod:`emu.npu.tensor`); the device module answers
as the chosen SoC's device does (name, SoC version, devices per server), so client code that
gates on the chip or spreads ranks over devices takes the branch it takes on the NPU.  The
hooks and device guard keep torch.distributed working (renaming privateuse1 alone makes
``dist.barrier()`` fail with "Please register PrivateUse1HooksInterface").  Streams and
events are honest no-ops: every CPU op has finished when it returns.
"""
from __future__ import annotations

import contextlib
import os
import time
import types

import torch
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

from ..core.soc import current_soc
from .tensor import npu_generator, register_factories


class Event:
    """torch.npu.Event on the CPU: records a wall-clock instant; waits are no-ops."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self._t: float | None = None

    def record(self, stream: "Stream | None" = None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream: "Stream | None" = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "Event") -> float:
        """Milliseconds between this event and ``end`` (both must have been recorded)."""
        return 1e3 * ((end._t or 0.0) - (self._t or 0.0))


class Stream:
    """torch.npu.Stream on the CPU: work is already done when it is issued."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        self.device = device
        self.priority = priority

    def wait_stream(self, stream: "Stream") -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, Stream)

    def __hash__(self) -> int:
        return 0


#: What the chosen SoC's device answers (EMU_SOC): name, torch_npu's SocVersion code, devices
#: per server (Atlas A3: 16 dies, Atlas A2: 8 NPUs), memory in bytes.
IDENTITIES = {
    "A3": ("Ascend910_9391", 250, 16, 64 << 30),
    "A2": ("Ascend910B3", 223, 8, 64 << 30),
}


def identity() -> tuple[str, int, int, int]:
    """(device name, SoC version code, devices per server, memory bytes) of the chosen SoC;
    ``EMU_NPU_DEVICE_NAME`` overrides the name."""
    name, code, per_server, memory = IDENTITIES[current_soc()]
    return os.environ.get("EMU_NPU_DEVICE_NAME", name), code, per_server, memory


def device_count() -> int:
    """``EMU_NPU_DEVICE_COUNT``, else the launch's ``LOCAL_WORLD_SIZE`` (torchrun), else the
    chosen SoC's devices per server (16 on A3, 8 on A2)."""
    for var in ("EMU_NPU_DEVICE_COUNT", "LOCAL_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return identity()[2]


def device_index(device=None) -> int:
    """3, "npu:3", torch.device("npu", 3) -> 3; None -> the current device."""
    if device is None:
        return _STATE.device
    if isinstance(device, torch.device):
        return _STATE.device if device.index is None else device.index
    if isinstance(device, str):
        return int(device.split(":")[1]) if ":" in device else _STATE.device
    return int(device)


def _checked(device=None) -> int:
    index = device_index(device)
    if not 0 <= index < device_count():
        raise RuntimeError(f"mc2-emu: invalid npu device {index}: device_count() is {device_count()} "
                           "(EMU_NPU_DEVICE_COUNT sets it)")
    return index


class DeviceState:
    """The current device index and the one stream of a ``torch.npu`` module."""

    def __init__(self):
        self.device = 0
        self.stream = Stream()

    def set_device(self, device) -> None:
        """Accepts 3, "npu:3" or torch.device("npu", 3) below device_count()."""
        self.device = _checked(device)

    def current_device(self) -> int:
        return self.device

    def current_stream(self, device=None) -> Stream:
        return self.stream


_STATE = DeviceState()


def _manual_seed(seed: int) -> None:
    """Seeds the npu random stream only (torch.manual_seed seeds it and the CPU's)."""
    npu_generator().manual_seed(int(seed))


def _properties(device=None) -> types.SimpleNamespace:
    name, _, _, memory = identity()
    return types.SimpleNamespace(name=name, total_memory=memory, multi_processor_count=1, index=_checked(device))


class NpuConfig:
    """``torch.npu.config``: the switches operator tests set (``allow_internal_format``: whether
    the NPU may keep private storage formats such as NZ); taken and remembered, without effect on
    the CPU's one layout."""

    allow_internal_format: bool = False


def make_device_module() -> types.ModuleType:
    """The ``torch.npu`` module: what client code touches, answering as the chosen SoC's
    device does; memory and streams are the CPU's (honest no-ops)."""
    m = types.ModuleType("torch.npu", __doc__)
    state = _STATE
    m.Stream, m.Event = Stream, Event
    m.is_available = lambda: True
    m.is_initialized = lambda: True
    m._lazy_init = lambda: None
    m._is_in_bad_fork = lambda: False
    m.device_count = device_count
    m.current_device = state.current_device
    m.set_device = state.set_device
    m.synchronize = lambda device=None: None
    m.manual_seed = m.manual_seed_all = _manual_seed
    m.seed = m.seed_all = lambda: npu_generator().seed()
    m.initial_seed = lambda: npu_generator().initial_seed()
    m.get_rng_state = lambda device=None: npu_generator().get_state()
    m.set_rng_state = lambda state, device=None: npu_generator().set_state(state)
    m.current_stream = state.current_stream
    m.default_stream = state.current_stream
    m.get_device_name = lambda device=None: _properties(device).name
    m.get_device_properties = _properties
    m.get_soc_version = lambda: identity()[1]
    m.empty_cache = lambda: None
    m.memory_allocated = lambda device=None: 0
    m.max_memory_allocated = lambda device=None: 0
    m.mem_get_info = lambda device=None: (identity()[3], identity()[3])
    m.memory_stats = lambda device=None: {}
    m.memory_reserved = lambda device=None: 0
    m.max_memory_reserved = lambda device=None: 0
    m.reset_peak_memory_stats = lambda device=None: None
    m.get_device_capability = lambda device=None: (0, 0)
    m.config = NpuConfig()

    @contextlib.contextmanager
    def stream(s: Stream | None = None):
        yield s

    @contextlib.contextmanager
    def device(d):
        before = state.device
        state.set_device(d)
        try:
            yield
        finally:
            state.device = before

    m.stream, m.device = stream, device
    return m


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return True

    def has_primary_context(self, dev_id) -> bool:
        return True

    def is_built(self) -> bool:
        return True


class _Guard(torch._C._acc.DeviceGuard):
    """The npu device guard (PyTorch's Python guard answers one device to the autograd engine:
    backward works on npu:0 tensors only)."""

    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


def register(module: types.ModuleType) -> None:
    """Rename privateuse1 to npu and register the hooks, device guard, ``module`` and where
    npu tensors are allocated."""
    _setup_privateuseone_for_python_backend(rename="npu", backend_module=module, hook=_Hooks(),
                                            device_guard=_Guard())
    register_factories()
