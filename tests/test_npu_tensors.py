"""npu tensors, RNG, device identity and "hccl" groups of the drop-in torch_npu, checked in a
process of their own (tests/npu_tensor_checks.py), and A2's V1 combine taking a 2-D expand_idx."""
from __future__ import annotations

import pytest

from npu_tensor_checks import CHECKS
from script_checks import results_of

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return results_of("npu_tensor_checks.py", "29533")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_npu_client_basics(results, name):
    assert results[name] == "ok", results[name]
