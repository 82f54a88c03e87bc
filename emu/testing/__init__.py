"""Multi-rank tests of your own MoE code, and the project's scenarios.

    import emu.testing as et
    et.World, et.WorldSpec, et.Outcome, et.RankError   worlds of rank processes and their answers
    et.per_rank, et.this_rank, et.Fault, et.leave       arguments, context and faults on the ranks
    et.assert_all_raise, et.assert_same_on_all_ranks    what MoE tests assert about every rank
    et.expected_dispatch, et.expected_combine           the single-process reference, torch_npu keywords
    et.dense_moe                                        a dense MoE layer to compare a pipeline with
    et.world, et.DistributedTest, et.check              pytest styles (the plugin: emu.testing.plugin)

``scenario`` holds the seeded whole-world scenarios the main job and the project's tests use;
``failures`` the one-line error reports of the launchers.
"""
from .asserts import assert_all_raise, assert_same_on_all_ranks
from ..core.inputs import AddRmsNorm
from .expect import dense_moe, expected_combine, expected_dispatch
from .harness import (Fault, Outcome, RankContext, RankError, RankFailed, World, WorldHung, WorldPool, WorldSpec,
                      leave, per_rank, this_rank)

_PYTEST_NAMES = ("world", "DistributedTest", "check")


def __getattr__(name: str):
    """The pytest styles, imported on first use (pytest is a test dependency only)."""
    if name in _PYTEST_NAMES:
        from .plugin import DistributedTest, check, world
        return {"world": world, "DistributedTest": DistributedTest, "check": check}[name]
    raise AttributeError(f"module 'emu.testing' has no attribute {name!r}")


__all__ = ["World", "WorldSpec", "WorldPool", "Outcome", "RankError", "RankFailed", "RankContext", "WorldHung",
           "Fault", "per_rank", "this_rank", "leave", "assert_all_raise", "assert_same_on_all_ranks",
           "expected_dispatch", "expected_combine", "dense_moe", "AddRmsNorm", *_PYTEST_NAMES]
