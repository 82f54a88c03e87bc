"""The native accelerator of the A3 data path (emu/a3/native.py) against the Python phases.

Each kernel is held to the Python code it replaces byte for byte on random inputs (single
process), and a 2-rank world with the accelerator on some ranks only is bit-exact with the
reference on every rank (the wire is the same, so ranks on either code interoperate).
"""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mp_cases
from emu.a3 import native
from emu.a3.dispatch import lay_out, quant_width, xt_width
from emu.comm.wire import Segments, pack_meta
from emu.core.attrs import Geometry
from emu.core.layout import DispatchOutputs, dispatch_shapes
from emu.core.numerics import ReceivedRows, combine_output, combine_rows, dynamic_quant, tp_add
from emu.testing.scenario import RankResult, Scenario, compare, run_reference

pytestmark = [pytest.mark.emu_world(2), pytest.mark.timeout(300)]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _needs_native():
    if native.library() is None:
        pytest.skip(f"accelerator unavailable: {native.status()}")


def _segments(rng: np.random.Generator, peers: int, width: int, most: int, slot: bool) -> Segments:
    n = rng.integers(0, most + 1, peers)
    if not slot:
        return Segments(n, width)
    per = int((n + -(-4 * n // width)).max()) + 2
    return Segments(n, width, start=np.arange(peers) * per + 1, total=peers * per)


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random XT values with infinities, NaNs, zeros of both signs and (fp16) subnormals mixed in."""
    v = torch.zeros(shape, dtype=dtype)
    flat = v.view(-1)
    if not flat.numel():
        return v
    flat.copy_(torch.from_numpy(rng.standard_normal(flat.numel()).astype(np.float32) * 4))
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3e-6, -6e-8, 65504.0]).to(dtype)
    where = torch.from_numpy(rng.integers(0, flat.numel(), max(flat.numel() // 16, 1)))
    flat[where] = special[torch.from_numpy(rng.integers(0, special.numel(), where.numel()))]
    return v


@SETTINGS
@given(seed=st.integers(0, 2**31), peers=st.integers(1, 8), h=st.sampled_from([4, 8, 64, 1024]),
       quant=st.booleans(), slot=st.booleans())
def test_pack_rows_writes_what_gather_and_write_meta_write(seed, peers, h, quant, slot):
    """Payload rows (bf16 rows, or int8 rows with their fp32 scale) and metadata words as the
    Python packing writes them, in back-to-back segments or in slots after a header row."""
    _needs_native()
    rng = np.random.default_rng(seed)
    if quant:
        src = torch.from_numpy(rng.integers(-128, 128, (7, h), dtype=np.int8))
        extra = torch.from_numpy(rng.standard_normal(7).astype(np.float32))
        width = quant_width(h)
    else:
        src, extra, width = _values(rng, (7, h), torch.bfloat16), None, xt_width(h, 2)
    seg = _segments(rng, peers, width, 5, slot)
    total = int(seg.n.sum())
    index = rng.integers(0, 7, total)
    meta = (rng.integers(0, 1 << 16, total), rng.integers(0, 32, total), rng.integers(0, 1024, total))
    want = torch.zeros(seg.total, width, dtype=torch.uint8)
    if quant:
        seg.gather((src.view(torch.uint8), extra.view(torch.uint8).view(-1, 4)), index, (want[:, :h], want[:, h:h + 4]))
    else:
        seg.gather((src,), index, (want.view(torch.bfloat16)[:, :h],))
    seg.write_meta(want, pack_meta(*meta))
    got = torch.zeros_like(want)
    assert native.pack_rows(got, width, seg.start, seg.n, src, index, extra, meta)
    rows = torch.from_numpy(seg.payload_index())
    assert torch.equal(got[rows], want[rows])
    assert np.array_equal(seg.read_meta(got), seg.read_meta(want))


def test_pack_rows_declines_rows_not_word_aligned():
    """A row width that is not a multiple of 4 (bf16 rows of odd H): the Python code packs them."""
    _needs_native()
    seg = Segments(np.array([1]), 6)
    buf = torch.zeros(seg.total, 6, dtype=torch.uint8)
    zero = np.zeros(1, np.int64)
    assert not native.pack_rows(buf, 6, seg.start, seg.n, torch.ones(1, 3, dtype=torch.bfloat16), zero, None,
                                (zero, zero, zero))
    assert not buf.any()


def _wire(rng, geom: Geometry, rank: int, quant: bool, slot: bool, capacity: int):
    """A received buffer as the exchange leaves it: every source's rows for this rank's local
    experts (random, ``capacity`` at most in all), with their metadata tails."""
    h = geom.H
    width = quant_width(h) if quant else xt_width(h, 2)
    lr = geom.local_expert_num(rank)
    n = rng.integers(0, min(4, capacity // geom.W) + 1, geom.W)
    seg = Segments(n, width) if not slot else \
        Segments(n, width, start=np.arange(geom.W) * 16 + 1, total=geom.W * 16)
    total = int(n.sum())
    buf = torch.zeros(seg.total, width, dtype=torch.uint8)
    buf.view(-1)[:] = torch.from_numpy(rng.integers(0, 256, buf.numel(), dtype=np.uint8))
    if quant and total:
        buf[torch.from_numpy(seg.payload_index()), h:h + 4] = \
            torch.from_numpy(rng.standard_normal(total).astype(np.float32)).view(torch.uint8).view(-1, 4)
    local = np.sort(rng.integers(0, lr, total))
    meta = (rng.integers(0, geom.G, total), rng.integers(0, geom.K, total), local)
    seg.write_meta(buf, pack_meta(*meta))
    return buf, seg


def _bare(buf: torch.Tensor, seg: Segments, payload: int) -> tuple[torch.Tensor, Segments]:
    """The same received rows bare: ``payload`` bytes of each back to back, the metadata apart."""
    rows = buf[torch.from_numpy(seg.payload_index()), :payload].contiguous()
    return rows, Segments(seg.n, payload, meta=seg.read_meta(buf).copy())


@SETTINGS
@given(seed=st.integers(0, 2**31), w=st.integers(1, 6), local=st.integers(1, 3), quant=st.booleans(),
       slot=st.booleans(), order=st.booleans())
def test_dispatch_layout_is_lay_out(seed, w, local, quant, slot, order):
    """lay_out with the accelerator writes the outputs it writes without, whatever the sources'
    group order, and the same again from the rows bare (quant mode 0)."""
    _needs_native()
    rng = np.random.default_rng(seed)
    geom = Geometry(W=w, S=0, Ns=0, E=w * local, K=min(2, w * local), H=16, G=8, tp=0)
    rank = int(rng.integers(0, w))
    shapes = dispatch_shapes(geom, rank, 8)
    buf, seg = _wire(rng, geom, rank, quant, slot, shapes.capacity)
    perm = rng.permutation(w) if order else None
    dom = SimpleNamespace(rank=rank, group_to_logical=lambda: np.arange(w) if perm is None else np.argsort(perm))
    prep = SimpleNamespace(route=geom, shapes=shapes, xt=torch.bfloat16)
    outs = []
    for got, segs in [(buf, seg)] + ([] if quant else [_bare(buf, seg, 2 * geom.H)]):
        for flag in ("0", "1"):
            out = DispatchOutputs.allocate(shapes, geom.H, torch.int8 if quant else torch.bfloat16)
            with mock.patch.dict(os.environ, {"EMU_NATIVE": flag}):
                own, counts = lay_out(dom, prep, got, segs, out)
            outs.append((out.as_tuple(), own, counts.tolist()))
    a, own_a, c_a = outs[0]
    for b, own_b, c_b in outs[1:]:
        assert (own_a, c_a) == (own_b, c_b)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                                                      y.view(torch.uint8) if y.dtype.is_floating_point else y)


def test_dispatch_layout_declines_a_word_outside_the_blocks():
    _needs_native()
    seg = Segments(np.array([1, 0]), 16)
    buf = torch.zeros(seg.total, 16, dtype=torch.uint8)
    seg.write_meta(buf, pack_meta(np.array([0]), np.array([0]), np.array([1])))      # local expert 1 of 1
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    outs = (x, None, torch.zeros(12, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    assert native.dispatch_layout(buf, seg, np.arange(2), (2, 2, 16, 4), outs) is None
    assert not outs[2].any() and not outs[3].any()


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(0, 9), h=st.sampled_from([1, 7, 64, 1024]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), smooth=st.booleans(), ties=st.booleans())
def test_dynamic_quant_is_numerics_dynamic_quant(seed, n, h, dtype, smooth, ties):
    """Dynamic int8 rows and scales bit for bit: all-zero rows, fp16 subnormals, large values,
    smooth scales, and (ties) rows whose products fall on .5 (rounded half to even)."""
    _needs_native()
    rng = np.random.default_rng(seed)
    x = _values(rng, (5, h), dtype)
    x[~torch.isfinite(x)] = 0
    x[1] = 0
    if ties:                                      # amax 127: d = 1, the row is rounded as it is
        x[2] = torch.from_numpy(rng.integers(-254, 255, h) / 2).to(dtype)
        x[2, 0] = 127
    scales = torch.from_numpy(rng.uniform(0.1, 3, (3, h)).astype(np.float32)) if smooth else None
    token = rng.integers(0, 5, n)
    srow = rng.integers(0, 3, n) if smooth else None
    got = native.dynamic_quant(x, token, scales, srow)
    want = dynamic_quant(x[torch.from_numpy(token)], scales[torch.from_numpy(srow)] if smooth else None)
    assert got is not None
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.int32), want[1].view(torch.int32))


def test_dynamic_quant_declines_values_that_are_not_finite():
    _needs_native()
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    x[1, 2] = float("inf")
    assert native.dynamic_quant(x, np.array([0, 1]), None, None) is None
    assert native.dynamic_quant(x, np.array([0]), None, None) is not None


def _combine_case(rng: np.random.Generator, bs: int, slots: int, h: int, dtype: torch.dtype, peers: int,
                  special: bool, dup: bool = False) -> tuple[Segments, torch.Tensor, np.ndarray, torch.Tensor]:
    """Received rows for (token, slot) pairs in random order over ``peers`` segments (each pair
    about 70 % likely; with ``dup`` three of them twice): the segments, the (rows, width)
    buffer, the pairs and their values (``special``: with infinities, NaNs, signed zeros)."""
    pairs = np.array([(t, s) for t in range(bs) for s in range(slots) if rng.random() < 0.7], dtype=np.int64)
    pairs = pairs.reshape(-1, 2)
    if dup and len(pairs):
        pairs = np.concatenate([pairs, pairs[rng.integers(0, len(pairs), 3)]])
    pairs = pairs[rng.permutation(len(pairs))]
    cuts = np.sort(rng.integers(0, len(pairs) + 1, peers - 1))
    seg = Segments(np.diff(np.concatenate([[0], cuts, [len(pairs)]])), 2 * h + (2 if h % 2 else 0))
    buf = torch.zeros(seg.total, seg.width, dtype=torch.uint8)
    rows = _values(rng, (len(pairs), h), dtype) if special else \
        torch.from_numpy(rng.standard_normal((len(pairs), h)).astype(np.float32)).to(dtype)
    if len(pairs):
        buf[torch.from_numpy(seg.payload_index()), :2 * h] = rows.view(torch.uint8).view(len(pairs), 2 * h)
    seg.write_meta(buf, pack_meta(pairs[:, 0], pairs[:, 1], np.zeros(len(pairs), np.int64)))
    return seg, buf, pairs, rows


@SETTINGS
@given(seed=st.integers(0, 2**31), bs=st.integers(1, 9), k=st.integers(1, 4), shared=st.integers(0, 2),
       h=st.sampled_from([1, 5, 64, 1024]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       peers=st.integers(1, 4), dup=st.booleans())
def test_combine_sum_is_combine_rows(seed, bs, k, shared, h, dtype, peers, dup):
    """The k-order fp32 sum, bit for bit, with infinities, fp16 subnormals, shared slots, and
    (dup) rows returned twice for one (token, slot), which both add in the order received; a NaN
    where the Python sum has one (its sign and payload follow the operand order each compiler
    picks for a commutative add, which IEEE leaves open)."""
    _needs_native()
    rng = np.random.default_rng(seed)
    slots = k + shared
    seg, buf, pairs, _ = _combine_case(rng, bs, slots, h, dtype, peers, True, dup)
    width, idx = seg.width, seg.payload_index()
    w = _values(rng, (bs, k), torch.float32)
    inp = SimpleNamespace(expert_ids=torch.zeros(bs, k, dtype=torch.int32), expert_scales=w, shared_expert_x=None,
                          special=SimpleNamespace(copy=0, const=0, ori_x=None))
    if width == 2 * h:
        src = buf.view(dtype)
    else:
        src = buf[:, :2 * h].contiguous().view(dtype)
    want = combine_rows(ReceivedRows(src, pairs[:, 0], pairs[:, 1], index=idx), inp, None, shared)
    nan = want.isnan()
    for rows, segs in ((buf, seg), _bare(buf, seg, 2 * h)):                # packed, then bare
        got = torch.zeros(bs, h, dtype=torch.float32)
        assert native.combine_sum(rows, segs, dtype, w.contiguous(), slots, got)
        assert torch.equal(got.isnan(), nan)           # a NaN's sign and payload are the host's: not held
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@SETTINGS
@given(seed=st.integers(0, 2**31), bs=st.integers(1, 9), k=st.integers(1, 4), shared=st.integers(0, 2),
       h=st.sampled_from([1, 5, 64, 1024]), peers=st.integers(1, 4), shared_x=st.booleans(),
       inactive=st.booleans(), special=st.booleans())
def test_combine_out_is_the_python_sum_rounded(seed, bs, k, shared, h, peers, shared_x, inactive, special):
    """x_out straight from the received bf16 rows is, bit for bit, the Python sum plus
    shared_expert_x rounded by torch, with inactive tokens zero (``combine_output``); a NaN to
    round (whose bits torch picks by code path) declines, as does nothing else."""
    _needs_native()
    rng = np.random.default_rng(seed)
    slots = k + shared
    seg, buf, pairs, _ = _combine_case(rng, bs, slots, h, torch.bfloat16, peers, special)
    w = _values(rng, (bs, k), torch.float32) if special else torch.from_numpy(rng.random((bs, k), np.float32))
    sx = _values(rng, (bs, h), torch.bfloat16) if shared_x else None
    tokens = np.arange(bs) < (rng.integers(0, bs + 1) if inactive else bs)
    inp = SimpleNamespace(expert_ids=torch.zeros(bs, k, dtype=torch.int32), expert_scales=w, shared_expert_x=None,
                          special=SimpleNamespace(copy=0, const=0, ori_x=None), norm=None,
                          expand_x=torch.empty(0, h, dtype=torch.bfloat16))
    acc = combine_rows(ReceivedRows(buf.view(torch.bfloat16)[:, :h], pairs[:, 0], pairs[:, 1],
                                    index=seg.payload_index()), inp, None, shared)
    if sx is not None:
        acc.add_(sx.to(torch.float32))
    want = combine_output(acc, inp, tokens)
    for rows, segs in ((buf, seg), _bare(buf, seg, 2 * h)):                # packed, then bare
        got = torch.full((bs, h), 7.0, dtype=torch.bfloat16)
        took = native.combine_out(rows, segs, w.contiguous(), slots, sx, None if tokens.all() else tokens, got)
        assert took == (not bool(want.isnan().any()))
        if took:
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_combine_out_declines_a_token_out_of_range():
    _needs_native()
    seg = Segments(np.array([1]), 4)
    buf = torch.zeros(seg.total, 4, dtype=torch.uint8)
    seg.write_meta(buf, pack_meta(np.array([3]), np.array([0]), np.array([0])))
    out = torch.zeros(3, 2, dtype=torch.bfloat16)
    assert not native.combine_out(buf, seg, torch.ones(3, 1), 1, None, None, out)
    assert native.combine_out(buf[:0], Segments(np.zeros(1, np.int64), 4), torch.ones(3, 1), 1,
                              torch.ones(3, 2, dtype=torch.bfloat16), np.array([True, False, True]), out)
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]


def test_combine_sum_declines_a_token_out_of_range():
    _needs_native()
    seg = Segments(np.array([1]), 4)
    buf = torch.zeros(seg.total, 4, dtype=torch.uint8)
    seg.write_meta(buf, pack_meta(np.array([3]), np.array([0]), np.array([0])))
    acc = torch.zeros(3, 2)
    assert not native.combine_sum(buf, seg, torch.bfloat16, torch.ones(3, 1), 1, acc)
    assert not acc.any()


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(0, 9), h=st.sampled_from([1, 7, 64, 1024]), big=st.booleans())
def test_tp_add_is_numerics_tp_add(seed, n, h, big):
    """The bf16 TP reduce bit for bit: infinities, zeros of both signs, sums that fall halfway
    between two bf16 values (rounded to even) and (big) sums that round up to infinity."""
    _needs_native()
    rng = np.random.default_rng(seed)
    a, b = _values(rng, (n, h), torch.bfloat16), _values(rng, (n, h), torch.bfloat16)
    if big:
        a.mul_(2.0 ** 125)
        b.mul_(2.0 ** 125)
    for t in (a, b):
        t[t.isnan()] = 1.0
    finite = a.isfinite() & b.isfinite()
    b[~finite] = torch.where(a[~finite] > 0, 1.0, -1.0).to(torch.bfloat16)   # no inf - inf
    if n and h > 1:
        a[0, 0], b[0, 0] = 1.0, 2.0 ** -8                # halfway: to even (1.0)
        a[0, 1], b[0, 1] = 1.0 + 2.0 ** -7, 2.0 ** -8    # halfway: to even (1 + 2^-6)
    got = native.tp_add(a, b)
    assert got is not None
    assert torch.equal(got.view(torch.int16), tp_add(a, b).view(torch.int16))
    wide = torch.zeros(n, h + 8, dtype=torch.bfloat16)            # rows of a wider wire buffer
    wide[:, :h] = b
    assert torch.equal(native.tp_add(a, wide[:, :h]).view(torch.int16), got.view(torch.int16))
    if n:                                                # fused with the packing: what pack_rows writes of the sum
        seg = _segments(rng, 3, xt_width(h, 2), 4, bool(seed % 2))
        total = int(seg.n.sum())
        index = rng.integers(0, n, total)
        meta = (rng.integers(0, 1 << 16, total), rng.integers(0, 32, total), rng.integers(0, 1024, total))
        want, fused = (torch.zeros(seg.total, seg.width, dtype=torch.uint8) for _ in range(2))
        assert native.pack_rows(want, seg.width, seg.start, seg.n, got, index, None, meta)
        assert native.pack_tp_add(fused, seg, (a, wide[:, :h]), index, meta)
        assert torch.equal(fused, want)


def test_tp_add_declines_nan_and_other_layouts():
    _needs_native()
    a = torch.ones(2, 4, dtype=torch.bfloat16)
    b = a.clone()
    assert native.tp_add(a, b) is not None
    b[1, 3] = float("nan")
    assert native.tp_add(a, b) is None
    b[1, 3], a[0, 0], b[0, 0] = 1.0, float("inf"), -float("inf")     # inf - inf
    assert native.tp_add(a, b) is None
    assert native.tp_add(a.half(), b.half()) is None
    assert native.tp_add(torch.ones(4, 2, dtype=torch.bfloat16).t(), a) is None      # values not contiguous
    assert native.tp_add(a.view(-1), b.view(-1)) is None
    seg = Segments(np.array([2]), xt_width(4, 2))
    buf = torch.zeros(seg.total, seg.width, dtype=torch.uint8)
    meta = (np.arange(2), np.zeros(2, np.int64), np.zeros(2, np.int64))
    assert not native.pack_tp_add(buf, seg, (a, b), np.arange(2), meta)             # inf - inf: NaN
    assert not native.pack_tp_add(buf, seg, (a.half(), b.half()), np.arange(2), meta)


def test_without_a_compiler_the_python_code_runs(tmp_path):
    """No C compiler: the accelerator reports why it is off, and the phases run their Python code."""
    code = ("from emu.a3 import native; import torch, numpy as np\n"
            "print(native.status()); print(native.pack_rows(torch.zeros(2, 4, dtype=torch.uint8), 4,"
            " np.zeros(1), np.ones(1), torch.zeros(1, 2, dtype=torch.bfloat16), np.zeros(1), None,"
            " (np.zeros(1), np.zeros(1), np.zeros(1))))")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), EMU_NATIVE_DIR=str(tmp_path / "cache"), PATH="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.split("\n")
    assert out.returncode == 0, out.stderr
    assert lines[0].startswith("off: ") and "no-such-cc" in lines[0] and lines[1] == "False"


def test_processes_that_build_at_once_all_load_the_accelerator(tmp_path):
    """Ranks that start together on a fresh machine build it at the same time: each builds into a
    file of its own and moves it into place, so every one of them loads a whole library."""
    _needs_native()
    code = "from emu.a3 import native; print(native.status())"
    env = dict(os.environ, EMU_NATIVE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["on"] * 4, outs
    assert len(list((tmp_path / "cache").iterdir())) == 1


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(moe_per_rank=st.sampled_from([1, 2, 3]), k=st.integers(1, 3), bs=st.integers(1, 9),
       quant=st.sampled_from([0, 2]), smooth=st.booleans(), comm_quant=st.sampled_from([0, 2]),
       dtype=st.sampled_from(["bf16", "fp16"]), mask=st.sampled_from(["none", "1d", "2d"]),
       shared_ranks=st.sampled_from([0, 1]), accel=st.sampled_from([[0, 1], [0], [1]]),
       fast=st.sampled_from([[0, 1], []]), transport=st.sampled_from(["auto", "bare"]), seed=st.integers(0, 10_000))
def test_ranks_with_and_without_the_accelerator_are_bit_exact(world, moe_per_rank, k, bs, quant, smooth, comm_quant,
                                                              dtype, mask, shared_ranks, accel, fast, transport, seed):
    """Three round trips with the accelerator on some ranks, rows packed or bare where the op can:
    every rank bit-exact with the reference."""
    moe = (2 - shared_ranks) * moe_per_rank
    fields = dict(ep=2, moe=moe, shared_ranks=shared_ranks, k=min(k, moe), bs=bs, h=1024, quant=quant,
                  smooth=smooth and quant == 2, comm_quant=comm_quant, dtype=dtype, mask=mask, seed=seed, calls=3)
    got = world.run(mp_cases.native, env={"EMU_TRANSPORT": transport}, native_ranks=accel, fast_ranks=fast, **fields)
    want = run_reference(Scenario(**fields))
    for g, res in enumerate(got):
        (dispatch, x_out, _), status = res.get()
        assert status == ("on" if g in accel else "off: EMU_NATIVE=0"), (g, status)
        assert not compare(RankResult(dispatch=dispatch, x_out=x_out), want[g]), (g, fields)
