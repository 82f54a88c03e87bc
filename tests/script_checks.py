"""Checks that run in a script of their own (``emu.npu.install()`` changes torch for the whole
process), and the pytest side that runs the script: one JSON object, check name -> "ok" or the
failure's traceback.  Used by tests/npu_tensor_checks.py and tests/npu_process_checks.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def registry(checks: dict[str, Callable[[], None]]) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """A decorator that registers a check in ``checks`` under its name."""
    def check(fn: Callable[[], None]) -> Callable[[], None]:
        checks[fn.__name__] = fn
        return fn
    return check


def raises(kind: type[Exception], words: str, fn: Callable[[], object]) -> None:
    """``fn()`` raises ``kind`` with ``words`` in its message."""
    try:
        fn()
    except kind as exc:
        assert words in str(exc), exc
        return
    raise AssertionError(f"{fn} did not raise {kind.__name__}")


def run_all(checks: dict[str, Callable[[], None]]) -> dict[str, str]:
    """Every check, in order: "ok" or its traceback."""
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()
    return results


def results_of(script: str, *args: str) -> dict[str, str]:
    """Run tests/``script`` in a clean process (no chip or device-count settings) and read its JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("EMU_SOC", "LOCAL_WORLD_SIZE", "EMU_NPU_DEVICE_COUNT")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", script), *args],
                         capture_output=True, text=True, timeout=150, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
