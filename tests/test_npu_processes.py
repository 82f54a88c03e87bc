"""npu tensors crossing processes (torch.multiprocessing with "spawn": Process arguments, queues, pools)
and their storage (``untyped_storage()``, ``resize_(0)``, ``record_stream``, ``torch.save``), checked in
a process of their own (tests/npu_process_checks.py)."""
from __future__ import annotations

import pytest

from npu_process_checks import CHECKS
from script_checks import results_of

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return results_of("npu_process_checks.py")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_npu_processes_and_storage(results, name):
    assert results[name] == "ok", results[name]
