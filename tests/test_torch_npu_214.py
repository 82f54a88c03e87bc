"""torch_npu 2.14.0 as released, read from its wheel: the MC2 ops' signatures (schema) and
output allocation (meta functions) against mc2-emu's API, its torch_npu module, and real calls
on an 8-rank world (EP 8 and EP 4 x TP 2, shared ranks and replicas, L 1-2, quant 0/2,
expert_scales, global_bs, elastic).  Skipped when the wheel is not downloaded (npu_wheel.DOWNLOAD).

Eager allocation differs from the meta functions in one output: torch_npu's eager kernels
(op-plugin, MoeDistributeDispatch*KernelOpApi.cpp) always give expand_scales A entries, the
meta functions 0 unless expert_scales is given; EMU_ALLOCATION=graph gives the meta shapes.
"""
from __future__ import annotations

import inspect
import random

import pytest
import torch

import emu
import emu.npu.ops  # noqa: F401 (registers torch.ops.npu)
import mp_cases
import npu_wheel
from emu.core.attrs import Geometry
from emu.core.inputs import dtype_code
from emu.core.layout import dispatch_shapes
from emu.testing import WorldSpec

pytestmark = pytest.mark.timeout(300)
WHEEL = npu_wheel.find_wheel()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason=f"torch_npu {npu_wheel.VERSION} wheel not found: "
                                                       f"{npu_wheel.DOWNLOAD} (or set MC2_EMU_TORCH_NPU_WHEEL)")
API = {"npu_moe_distribute_dispatch": emu.moe_distribute_dispatch,
       "npu_moe_distribute_dispatch_v2": emu.moe_distribute_dispatch_v2,
       "npu_moe_distribute_combine": emu.moe_distribute_combine,
       "npu_moe_distribute_combine_v2": emu.moe_distribute_combine_v2,
       "npu_moe_distribute_combine_add_rms_norm": emu.moe_distribute_combine_add_rms_norm}


@pytest.fixture(scope="module")
def wheel_meta():
    return npu_wheel.meta_functions(WHEEL)


@needs_wheel
@pytest.mark.parametrize("op", npu_wheel.OPS)
def test_signatures_equal_the_schema(op):
    """The API's Python signatures (the torch_npu module's ops carry the schema itself: test_npu_ops.py)."""
    want = npu_wheel.schema(WHEEL)[op]
    got = list(inspect.signature(API[op]).parameters.values())
    assert [p.name for p in got] == [p.name for p in want]
    assert [p.kind == p.KEYWORD_ONLY for p in got] == [p.keyword_only for p in want]
    assert [p.default if p.default is not p.empty else npu_wheel.REQUIRED for p in got] == [p.default for p in want]


def _random_geometry(rng: random.Random) -> tuple[Geometry, dict]:
    """A valid A3 configuration and the same as torch_npu keyword arguments."""
    tp = rng.choice([0, 1, 2])
    W = rng.choice([2, 4, 8, 16, 32, 64])
    ns, S = rng.choice([(1, 0), (0, 0)] + [(n, r) for n in (1, 2) for r in (n, 2 * n, 4 * n) if r < W])
    L = 1 if tp == 2 else rng.choice([1, 2, 3])
    E, K, bs = L * (W - S), rng.randint(1, 8), rng.randint(1, 16)
    K = min(K, E)
    G = rng.choice([0, bs * W, 2 * bs * W])
    attrs = dict(tp_world_size=tp, shared_expert_num=ns, shared_expert_rank_num=S, global_bs=G,
                 quant_mode=rng.choice([0, 2]))
    rewritten = 0 if (S == 0 and ns == 1) else ns
    return Geometry(W=W, S=S, Ns=rewritten, E=E, K=K, H=1024, G=G or bs * W, tp=tp), dict(attrs, bs=bs)


@needs_wheel
@pytest.mark.parametrize("seed", range(4))
def test_allocation_rule_equals_the_meta_functions(wheel_meta, seed):
    """dispatch_shapes against the wheel's meta functions on 300 random configurations and ranks:
    equal under graph allocation; eager differs only in expand_scales (A entries).  The registered
    ops' fake kernels (on meta tensors) give the meta functions' shapes and dtypes."""
    rng = random.Random(seed)
    for _ in range(300):
        geom, attrs = _random_geometry(rng)
        bs = attrs.pop("bs")
        rank = rng.randrange(geom.W)
        v1 = rng.random() < 0.25 and geom.Ns <= 1 and (geom.S == 0 or geom.W % geom.S == 0)
        elastic = not v1 and geom.tp < 2 and rng.random() < 0.3
        given = rng.random() < 0.3
        x, ids = npu_wheel.meta((bs, 1024), torch.bfloat16), npu_wheel.meta((bs, geom.K), torch.int32)
        extra = dict(expert_scales=npu_wheel.meta((bs, geom.K), torch.float32) if given else None)
        if v1:
            fn = wheel_meta["npu_moe_distribute_dispatch_meta"]
        else:
            fn = wheel_meta["npu_moe_distribute_dispatch_v2_meta"]
            extra["elastic_info"] = npu_wheel.meta((4 + 2 * geom.W,), torch.int32) if elastic else None
        outs = fn(x, ids, "ep", geom.W, rank, geom.E, **attrs, **extra)
        want = [o.shape[0] for o in outs]
        for graph in (True, False):
            s = dispatch_shapes(geom, rank, bs, elastic=elastic, expert_scales=given, v1=v1, graph=graph)
            got = [s.rows, s.dynamic_scales, bs * geom.K if v1 else s.assist, s.token_nums, s.ep_recv, s.tp_recv,
                   s.expand_scales]
            if not graph and not given:
                want = want[:6] + [s.capacity]               # eager: expand_scales always has A entries
            assert got == want, (geom, rank, dict(v1=v1, elastic=elastic, expert_scales=given, graph=graph))
        fake = (torch.ops.npu.npu_moe_distribute_dispatch if v1 else torch.ops.npu.npu_moe_distribute_dispatch_v2)(
            x, ids, "ep", geom.W, rank, geom.E, **attrs, **extra)            # the registered op's fake kernel
        assert [(o.shape, o.dtype) for o in fake] == [(o.shape, o.dtype) for o in outs], (geom, rank, v1)


def _tensor_args(described: dict) -> dict:
    """Meta tensors for the described tensors; a torch.dtype given as y_dtype as torch_npu sees
    it (its enum value)."""
    out = {k: npu_wheel.meta(v[1], v[2]) if isinstance(v, tuple) and v and v[0] == "tensor" else v
           for k, v in described.items()}
    return {k: dtype_code(v) if isinstance(v, torch.dtype) else v for k, v in out.items()}


def _configs() -> list[dict]:
    """Real-call configurations on 8 ranks, every supported kind at least once."""
    rng = random.Random(214)
    out = [dict(), dict(shared=2, shared_ranks=4, moe=4, k=2), dict(shared_ranks=2, moe=12, k=3, quant=2, smooth=True),
           dict(shared_ranks=0, shared=0, moe=16, k=4, global_bs=64, bs=4), dict(ep=4, tp=2, moe=3, k=2),
           dict(ep=4, tp=2, shared_ranks=0, shared=0, moe=4, k=2, quant=2),
           dict(moe=14, k=2, removed="6,7", quant=2), dict(moe=7, k=3, elastic_flag0=True),
           dict(shared_ranks=2, moe=12, k=2, expert_scales=True), dict(shared_ranks=0, moe=8, k=2, tp=1),
           dict(v1=True, shared_ranks=2, moe=6, k=2, quant=2), dict(v1=True, shared_ranks=0, moe=16, k=3,
                                                                    expert_scales=True),
           dict(norm=True, shared_ranks=1, moe=14, k=3), dict(y_dtype=1, quant=2, moe=7),
           dict(y_dtype=torch.bfloat16, moe=7)]
    for c in out:
        c.setdefault("bs", rng.randint(1, 6))
        c.update(h=1024, seed=rng.randrange(1000))
    return out


@needs_wheel
def test_real_calls_allocate_as_torch_npu(emu_pool, wheel_meta):
    world = emu_pool.get(WorldSpec.of(8))
    for case in _configs():
        for mode in ("eager", "graph"):
            res = world.run(mp_cases.allocation_report, env={"EMU_ALLOCATION": mode}, **case)
            for o in res:
                rep = o.get()
                if rep == "idle":
                    continue
                args = _tensor_args(rep["dispatch"])
                name = "npu_moe_distribute_dispatch_meta" if case.get("v1") else "npu_moe_distribute_dispatch_v2_meta"
                want = [(tuple(t.shape), t.dtype) for t in wheel_meta[name](**args)]
                given = args.get("expert_scales") is not None
                if mode == "eager" and not given:             # eager: expand_scales has A entries
                    want[6] = ((want[1][0][0] // max(args["tp_world_size"], 1),), torch.float32)
                assert rep["dispatch_out"] == want, (case, mode, o.rank)
                out = rep["dispatch_out"]
                comb = _combine_meta(wheel_meta, case, rep, out)
                assert rep["combine_out"] == comb, (case, mode, o.rank)


def _combine_meta(wheel_meta: dict, case: dict, rep: dict, out: list) -> list:
    expand_x = npu_wheel.meta(out[0][0], torch.bfloat16 if out[0][1] == torch.int8 else out[0][1])
    ids = npu_wheel.meta((rep["bs"], rep["dispatch"]["expert_ids"][1][1]), torch.int32)
    some = npu_wheel.meta((1,), torch.int32)
    if case.get("norm"):
        res = wheel_meta["npu_moe_distribute_combine_add_rms_norm_meta"](
            expand_x, ids, some, some, some, some, some, "ep", 8, 0, 8)
    elif case.get("v1"):
        res = [wheel_meta["npu_moe_distribute_combine_meta"](expand_x, ids, some, some, some, "ep", 8, 0, 8)]
    else:
        res = [wheel_meta["npu_moe_distribute_combine_v2_meta"](expand_x, ids, some, some, some, "ep", 8, 0, 8)]
    return [(tuple(t.shape), t.dtype) for t in res]
