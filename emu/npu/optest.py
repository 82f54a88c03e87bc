"""``torch_npu.testing`` as Ascend's operator tests use it, on the CPU: what a test script of
the MC2 and routing operators imports, with the behaviour its documentation and use imply.

* ``torch_npu.testing.testcase``: :class:`TestCase` (seeded ``setUp``; ``assertEqual`` with a
  precision for tensors, numbers and sequences; ``assertRtolEqual`` with fp16 / bf16
  tolerances) and :func:`run_tests` (``unittest.main``);
* ``torch_npu.testing.common_utils``: :func:`create_common_tensor`, :class:`SupportedDevices`,
  :func:`get_npu_device` / :func:`set_npu_device`;
* ``torch_npu.testing.common_distributed``: :func:`skipIfUnsupportMultiNPU`.

Not provided: the rest of those modules (OpInfo tables, profiling and baseline helpers, XML
reports in CI).
"""
from __future__ import annotations

import importlib.machinery
import os
import random
import sys
import types
import unittest
from collections.abc import Callable, Sequence
from functools import wraps
from numbers import Number

import numpy as np
import torch

from .ops import npu_format_cast


def get_npu_device() -> str:
    """``npu:N`` from ``SET_NPU_DEVICE`` (default ``npu:0``)."""
    return f"npu:{os.environ.get('SET_NPU_DEVICE', '0')}"


def set_npu_device() -> str:
    device = get_npu_device()
    torch.npu.set_device(device)
    return device


def create_common_tensor(item: Sequence, min_value: float, max_value: float,
                         device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``item`` = [numpy dtype, npu format (-1: none), shape]: uniform values in
    [min_value, max_value) -> (CPU tensor, the same values on the npu device)."""
    dtype, npu_format, shape = item
    values = np.random.uniform(min_value, max_value, shape).astype(dtype)
    npu = torch.from_numpy(values).to(device or get_npu_device())
    if npu_format != -1:
        npu = npu_format_cast(npu, npu_format)
    return torch.from_numpy(values), npu


def _device_family() -> str:
    """The device name as SupportedDevices compares it: "Ascend910B", "Ascend910_93", ..."""
    name = torch.npu.get_device_name(0)
    if name.startswith("Ascend910_"):
        return name[:12]
    if name.startswith("Ascend950"):
        return name[:9]
    return name[:10]


class SupportedDevices:
    """Decorator: the test runs only on the listed device families (else it is skipped)."""

    def __init__(self, supported_devices: list[str]) -> None:
        self.supported_devices = supported_devices

    def __call__(self, fn: Callable) -> Callable:
        @wraps(fn)
        def run(test, *args, **kwargs):
            family = _device_family()
            if family not in self.supported_devices:
                raise unittest.SkipTest(f"Only run on {self.supported_devices!r}, current device is {family}.")
            return fn(test, *args, **kwargs)

        return run


def skipIfUnsupportMultiNPU(npu_number_needed: int) -> Callable:  # noqa: N802 - torch_npu's name
    """Decorator: skip unless ``torch.npu.device_count()`` is at least ``npu_number_needed``."""
    def wrap(fn: Callable) -> Callable:
        @wraps(fn)
        def run(test, *args, **kwargs):
            if torch.npu.device_count() < npu_number_needed:
                raise unittest.SkipTest(f"Multi-NPU {npu_number_needed} condition not satisfied")
            return fn(test, *args, **kwargs)

        return run

    return wrap


def run_tests() -> None:
    unittest.main(argv=sys.argv)


def _as_array(t) -> np.ndarray:
    return t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()


class TestCase(unittest.TestCase):
    """Seeded tests (``SEED``, default 666) with the tolerant comparisons operator tests use."""

    precision = 1e-5
    maxDiff = None

    @classmethod
    def setUpClass(cls) -> None:
        cls.npu_device = set_npu_device()

    def setUp(self) -> None:
        seed = int(os.environ.get("SEED", "666"))
        torch.manual_seed(seed)
        random.seed(seed)

    def assertRtolEqual(self, x, y, prec: float = 1e-4, prec16: float = 1e-3,  # noqa: N802
                        auto_trans_dtype: bool = False, message: str | None = None) -> None:
        """Elementwise |x - y| within ``prec`` absolutely or relatively (fp16: ``prec16``; bf16:
        allclose with ``prec16``); a few outliers (up to ``prec`` of the elements) pass."""
        if isinstance(x, Sequence) and isinstance(y, Sequence):
            for a, b in zip(x, y):
                self.assertRtolEqual(a, b, prec, prec16, auto_trans_dtype, message)
            return
        if torch.is_tensor(x) and torch.is_tensor(y):
            if auto_trans_dtype:
                x = x.to(y.dtype)
            self.assertEqual(tuple(x.shape), tuple(y.shape), message or "shape error")
            if x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16:
                self.assertTrue(torch.allclose(x.cpu(), y.cpu(), rtol=prec16, atol=prec16), message or "result error")
                return
            x, y = _as_array(x), _as_array(y)
        x, y = np.asarray(x), np.asarray(y)
        self.assertEqual(x.dtype, y.dtype, message or "dtype error")
        if x.dtype == np.bool_:
            self.assertTrue(np.array_equal(x, y), message or "result error")
            return
        tol, tiny = (prec16, 6e-8) if x.dtype == np.float16 else (prec, 1e-9)
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        self.assertTrue(np.array_equal(np.isnan(xf), np.isnan(yf)), message or "NaN positions differ")
        diff = np.abs(np.nan_to_num(yf - xf))
        rel_bad = diff / (np.maximum(np.abs(xf), np.abs(yf)) + tiny) > tol
        abs_bad = diff > tol
        if rel_bad.any() and abs_bad.any():
            allowed = x.size * tol
            self.assertFalse(rel_bad.sum() > allowed and abs_bad.sum() > allowed, message or "result error")

    def assertEqual(self, x, y, prec: float | str | None = None, message: str = "", **kwargs) -> None:  # noqa: N802
        """Tensors: same size, max |x - y| <= ``prec`` (default ``precision``); numbers within
        ``prec``; sequences element by element; anything else by ``==``."""
        if isinstance(prec, str) and not message:
            prec, message = None, prec
        prec = self.precision if prec is None else prec
        if torch.is_tensor(x) and torch.is_tensor(y):
            super().assertEqual(x.size(), y.size(), message)
            if x.numel():
                diff = (x.detach().cpu().double() - y.detach().cpu().double()).abs().max().item()
                self.assertLessEqual(diff, prec, message)
        elif isinstance(x, Number) and isinstance(y, Number) and not isinstance(x, bool):
            self.assertLessEqual(abs(x - y), prec, message)
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            super().assertEqual(len(x), len(y), message)
            for a, b in zip(x, y):
                self.assertEqual(a, b, prec, message)
        else:
            super().assertEqual(x, y, message)


def install(tnpu: types.ModuleType) -> None:
    """``torch_npu.testing`` and its submodules, in ``sys.modules``."""
    parts = {
        "testing": {},
        "testing.testcase": {"TestCase": TestCase, "run_tests": run_tests},
        "testing.common_utils": {"create_common_tensor": create_common_tensor, "SupportedDevices": SupportedDevices,
                                 "get_npu_device": get_npu_device, "set_npu_device": set_npu_device},
        "testing.common_distributed": {"skipIfUnsupportMultiNPU": skipIfUnsupportMultiNPU},
    }
    for suffix, names in parts.items():
        module = types.ModuleType(f"torch_npu.{suffix}", __doc__)
        module.__dict__.update(names)
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        module.__path__ = []
        sys.modules[module.__name__] = module
    testing = sys.modules["torch_npu.testing"]
    for suffix in ("testcase", "common_utils", "common_distributed"):
        setattr(testing, suffix, sys.modules[f"torch_npu.testing.{suffix}"])
    tnpu.testing = testing
