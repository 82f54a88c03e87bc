"""``npu`` as PyTorch's privateuse1 device, with Python hooks and a device module.

Tensors stay on the CPU: the device exists so that torch.distributed and client code that
asks for "the current accelerator" keep working (renaming privateuse1 alone makes
``dist.barrier()`` fail with "Please register PrivateUse1HooksInterface").  Streams and
events are honest no-ops: every CPU op has finished when it returns.
"""
from __future__ import annotations

import contextlib
import time
import types

import torch
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend


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


class DeviceState:
    """The current device index and the one stream of a ``torch.npu`` module."""

    def __init__(self):
        self.device = 0
        self.stream = Stream()

    def set_device(self, device) -> None:
        """Accepts 3, "npu:3" or torch.device("npu", 3); only remembered (tensors stay on the CPU)."""
        if isinstance(device, torch.device):
            self.device = device.index or 0
        elif isinstance(device, str):
            self.device = int(device.split(":")[1]) if ":" in device else 0
        else:
            self.device = int(device)

    def current_device(self) -> int:
        return self.device

    def current_stream(self, device=None) -> Stream:
        return self.stream


def make_device_module() -> types.ModuleType:
    """The ``torch.npu`` module: what MoE client code touches, all on the CPU."""
    m = types.ModuleType("torch.npu", __doc__)
    state = DeviceState()
    m.Stream, m.Event = Stream, Event
    m.is_available = lambda: True
    m.is_initialized = lambda: True
    m._is_in_bad_fork = lambda: False
    m.device_count = lambda: 1
    m.current_device = state.current_device
    m.set_device = state.set_device
    m.synchronize = lambda device=None: None
    m.manual_seed = lambda seed: torch.manual_seed(seed)
    m.manual_seed_all = lambda seed: torch.manual_seed(seed)
    m.current_stream = state.current_stream
    m.default_stream = state.current_stream
    m.get_device_name = lambda device=None: "mc2-emu CPU (npu emulated)"
    m.empty_cache = lambda: None
    m.memory_allocated = lambda device=None: 0
    m.max_memory_allocated = lambda device=None: 0
    m.mem_get_info = lambda device=None: (0, 0)
    m.memory_stats = lambda device=None: {}
    m.memory_reserved = lambda device=None: 0
    m.max_memory_reserved = lambda device=None: 0
    m.reset_peak_memory_stats = lambda device=None: None
    m.get_device_capability = lambda device=None: (0, 0)
    m.get_device_properties = lambda device=None: types.SimpleNamespace(
        name="mc2-emu CPU (npu emulated)", total_memory=0, multi_processor_count=1)

    @contextlib.contextmanager
    def stream(s: Stream | None = None):
        yield s

    m.stream = stream
    return m


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return True

    def has_primary_context(self, dev_id) -> bool:
        return True

    def is_built(self) -> bool:
        return True


class _Guard(torch._C._acc.DeviceGuard):
    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


def register(module: types.ModuleType) -> None:
    """Rename privateuse1 to npu and register the hooks, device guard and ``module``."""
    _setup_privateuseone_for_python_backend(rename="npu", backend_module=module, hook=_Hooks(),
                                            device_guard=_Guard())
