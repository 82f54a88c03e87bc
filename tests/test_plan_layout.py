"""The distributed path's pure pieces on the docs/dispatch.md world, worked by hand."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from emu.comm.call import (HEADER_BYTES, SLOT_FLOOR, SlotNeed, _kept, _slot_words, bare_slot, plan_slot, slot_bytes,
                            slot_plan)
from emu.comm.header import Header, Outgoing
from emu.comm.wire import Segments
from emu.core.attrs import Geometry
from emu.core.layout import (HEAP_BYTES, MAP_BYTES, DispatchOutputs, dispatch_shapes, expert_token_nums, lazy_zeros,
                              recv_layout)
from emu.core.plan import active_set, send_plan

pytestmark = pytest.mark.timeout(30)
GEOM = Geometry(W=4, S=1, Ns=1, E=6, K=2, H=8, G=8, tp=0)      # L = 2, R = 1
IDS = [[[0, 3], [2, 3]], [[1, 0], [5, 4]], [[0, 1], [0, 2]], [[4, 5], [3, 0]]]


def _plan(src, mask=None):
    ids = torch.tensor(IDS[src], dtype=torch.int32)
    return send_plan(GEOM, src, ids, active_set(2, 2, mask))


def test_send_plan_wire_order():
    """Source 1 (ids t0 [1, 0], t1 [5, 4]): to rank 0 (shared) t0, t1; to rank 1 expert 0 (t0,k1)
    then expert 1 (t0,k0); to rank 3 expert 4 (t1,k1) then expert 5 (t1,k0)."""
    p = _plan(1)
    assert p.dest.tolist() == [0, 0, 1, 1, 3, 3]
    assert p.local.tolist() == [0, 0, 0, 1, 0, 1]
    assert p.token.tolist() == [0, 1, 0, 0, 1, 1]
    assert p.slot.tolist() == [2, 2, 1, 0, 1, 0]
    assert p.smooth_row.tolist() == [0, 0, 1, 2, 5, 6]          # N_s + e for MoE, j for shared
    assert p.counts.tolist() == [2, 2, 0, 2]


def test_send_plan_1d_mask_is_popcount_prefix():
    p = _plan(1, torch.tensor([False, True]))                    # one True: token 0 is active
    assert p.token.tolist() == [0, 0, 0] and p.dest.tolist() == [0, 1, 1]


def test_recv_layout_rank1():
    """Rank 1 gets, source-major, rows with (src, local); the layout is local-major, source-minor."""
    src, local = [], []
    for s in range(4):
        p = _plan(s)
        mine = p.dest == 1
        src += [s] * int(mine.sum())
        local += p.local[mine].tolist()
    lay = recv_layout(GEOM, 1, np.array(src), np.array(local))
    assert [(src[i], local[i]) for i in lay.order] == [(0, 0), (1, 0), (2, 0), (2, 0), (3, 0), (1, 1), (2, 1)]
    assert lay.ep_recv_counts.tolist() == [1, 2, 4, 5, 5, 6, 7, 7]
    assert expert_token_nums(GEOM, 1, lay.ep_recv_counts, 7, 1).tolist() == [5, 2]
    assert expert_token_nums(GEOM, 1, lay.ep_recv_counts, 7, 0).tolist() == [5, 7]


def test_eager_shapes():
    moe, shared = dispatch_shapes(GEOM, 1, 2), dispatch_shapes(GEOM, 0, 2)
    assert (moe.rows, moe.assist, moe.token_nums, moe.ep_recv, moe.tp_recv) == (16, 128 * 16, 2, 8, 0)
    assert (shared.rows, shared.assist, shared.token_nums, shared.ep_recv) == (8, 128 * 8, 1, 4)
    tp = Geometry(W=2, S=0, Ns=0, E=2, K=1, H=8, G=4, tp=2)
    s = dispatch_shapes(tp, 0, 2)
    assert (s.rows, s.dynamic_scales, s.ep_recv, s.tp_recv, s.capacity) == (8, 8, 4, 2, 4)


@pytest.mark.parametrize("nbytes", [MAP_BYTES // 4, MAP_BYTES])
def test_fresh_outputs_are_zero_on_the_heap_and_in_their_own_mapping(nbytes):
    """Below MAP_BYTES the block comes from the heap, likely the one just freed full of ones;
    from it on, from a mapping of its own: zero either way, and writable."""
    rows = nbytes // (2 * 1024)
    dirty = torch.ones(rows, 1024, dtype=torch.bfloat16)
    del dirty
    for _ in range(2):
        out = lazy_zeros((rows, 1024), torch.bfloat16)
        assert out.shape == (rows, 1024) and out.dtype == torch.bfloat16
        assert int(torch.count_nonzero(out)) == 0
        out[rows // 2:].fill_(3.0)
        assert float(out.float().sum()) == 3.0 * (rows - rows // 2) * 1024
        del out


def test_outputs_a_call_mostly_writes_come_uncleared_and_it_clears_the_rest():
    """Dispatch expecting to write a third of expand_x's rows or more gets heap memory, dirty
    as a freed block may be; clear_unwritten zeroes exactly what the call did not write.  Fewer
    rows expected, or outputs past the heap's largest block: zeroed pages, as before."""
    shapes = dispatch_shapes(Geometry(W=2, S=0, Ns=0, E=2, K=1, H=8, G=4, tp=2), 0, 2)
    rows, h = shapes.rows, 1024
    assert not DispatchOutputs.allocate(shapes, h, torch.bfloat16).uncleared
    assert not DispatchOutputs.allocate(shapes, h, torch.bfloat16, (rows - 1) // 3).uncleared
    big = dataclasses.replace(shapes, rows=HEAP_BYTES // (2 * h))
    assert not DispatchOutputs.allocate(big, h, torch.bfloat16, big.rows).uncleared
    out = DispatchOutputs.allocate(shapes, h, torch.bfloat16, -(-rows // 3))
    assert out.uncleared
    for t in (out.expand_x, out.dynamic_scales, out.assist_info_for_combine):
        t.view(torch.uint8).fill_(0x5A)                   # what a freed block may hold
    written = rows // 2
    out.expand_x[:written] = 1.5
    out.dynamic_scales[:written] = 2.0
    out.assist_info_for_combine[:3 * written] = 7
    out.clear_unwritten(written, written, 3 * written)
    assert not out.uncleared
    assert torch.equal(out.expand_x[:written], torch.full((written, h), 1.5, dtype=torch.bfloat16))
    assert int(torch.count_nonzero(out.expand_x[written:])) == 0
    assert out.dynamic_scales.tolist() == [2.0] * written + [0.0] * (shapes.dynamic_scales - written)
    assist = out.assist_info_for_combine
    assert assist[:3 * written].tolist() == [7] * (3 * written) and int(torch.count_nonzero(assist[3 * written:])) == 0
    out.clear_unwritten(0, 0, 0)                          # a second call leaves what is there
    assert float(out.expand_x[0, 0]) == 1.5


def test_allocation_with_expert_scales_elastic_v1_and_graph():
    """torch_npu 2.14's allocation rules, worked by hand on small worlds."""
    # expert_scales given: ep_recv_counts W*L_r + 2*G*K*(W//8); W = 4 has no tail, W = 16 has 2 servers'
    assert dispatch_shapes(GEOM, 1, 2, expert_scales=True).ep_recv == 4 * 2 + 0
    a2 = Geometry(W=16, S=0, Ns=0, E=32, K=3, H=8, G=64, tp=0)     # L = 2
    s = dispatch_shapes(a2, 5, 4, expert_scales=True)
    assert (s.ep_recv, s.capacity, s.expand_scales) == (16 * 2 + 2 * 64 * 3 * 2, 64 * 2, 128)
    # tp 2: the x2 is dropped when sized for the tail
    tp = Geometry(W=2, S=0, Ns=0, E=2, K=1, H=8, G=4, tp=2)
    assert dispatch_shapes(tp, 0, 2).ep_recv == 4 and dispatch_shapes(tp, 0, 2, expert_scales=True).ep_recv == 2
    # graph capture (the meta functions): expand_scales has 0 entries unless expert_scales is given
    assert dispatch_shapes(GEOM, 1, 2).expand_scales == 16
    assert dispatch_shapes(GEOM, 1, 2, graph=True).expand_scales == 0
    assert dispatch_shapes(GEOM, 1, 2, graph=True, expert_scales=True).expand_scales == 16
    # two shared experts on 2 of 8 ranks (R = 1): V2 gives a shared rank maxBs*ceil(8/1) = 16 rows,
    # V1 G // S = 8; elastic: every rank max(16, G*min(L, K)) = max(16, 16*1) rows and L = 1 counts
    two = Geometry(W=8, S=2, Ns=2, E=6, K=2, H=8, G=16, tp=0)      # L = 1, maxBs = 2
    assert dispatch_shapes(two, 0, 2).capacity == 16 and dispatch_shapes(two, 0, 2, v1=True).capacity == 8
    e = dispatch_shapes(two, 0, 2, elastic=True)
    assert (e.capacity, e.token_nums, e.ep_recv) == (16, 1, 8)
    wide = Geometry(W=4, S=1, Ns=1, E=9, K=4, H=8, G=8, tp=0)      # L = 3: MoE A = 8*3 = 24, shared 8
    e = dispatch_shapes(wide, 0, 2, elastic=True)
    assert (e.capacity, e.token_nums, e.ep_recv, e.assist) == (24, 3, 12, 128 * 24)


@pytest.mark.parametrize("width", [2048, 1028, 1027, 6, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["back-to-back", "slots"])
def test_segment_metadata_round_trips_at_any_width(width, packed):
    """Each peer's metadata words land in its segment's tail rows, whatever the row width (int32
    words when the rows are a multiple of 4 bytes, bytes otherwise), and nothing else changes."""
    counts = np.array([3, 0, 5, 1])
    seg = Segments(counts, width, start=np.arange(4) * 20 + 1, total=80) if packed else Segments(counts, width)
    buf = torch.full((seg.total, width), 0xAB, dtype=torch.uint8)
    meta = np.arange(9, dtype=np.int32) * 1000003 - 7
    seg.write_meta(buf, meta)
    assert np.array_equal(seg.read_meta(buf), meta)
    flat = buf.view(-1).numpy()
    changed = np.flatnonzero(flat != 0xAB)
    for p in np.flatnonzero(counts):                # by hand: the 4*n bytes after the peer's payload rows
        lo = (seg.start[p] + counts[p]) * width
        words = meta[counts[:p].sum():counts[:p + 1].sum()]
        assert bytes(flat[lo:lo + 4 * counts[p]]) == words.tobytes()
    assert set(changed) <= {i for p in np.flatnonzero(counts)
                            for i in range((seg.start[p] + counts[p]) * width, (seg.start[p] + counts[p]) * width + 4 * counts[p])}


@pytest.mark.parametrize("seed", range(8))
def test_send_counts_equal_the_plans_counts(seed):
    """combine's cross-check counts (send_counts) equal the dispatch plan's, with shared ranks,
    special experts and 1-D / 2-D masks."""
    from emu.core.plan import send_counts
    g = np.random.default_rng(seed)
    special = seed % 2
    geom = Geometry(W=6, S=2, Ns=2, E=8, K=3, H=8, G=30, tp=0, zero=special, copy=special, const=special)
    bs = 5
    ids = torch.from_numpy(np.stack([g.permutation(geom.E + 3 * special)[:geom.K] for _ in range(bs)]).astype(np.int32))
    mask = [None, torch.from_numpy(g.random(bs) > 0.3), torch.from_numpy(g.random((bs, geom.K)) > 0.3)][seed % 3]
    for src in range(geom.W):
        act = active_set(bs, geom.K, mask)
        assert send_counts(geom, src, ids, act).tolist() == send_plan(geom, src, ids, act).counts.tolist()


def test_a_tp_pair_always_has_its_slot_and_a_large_group_with_few_rows_per_peer_none():
    """A 2-rank TP group sends all its rows to the one peer: its 2 slots cost twice what the rows
    fill, however many (1,000 rows of 2,064 bytes once took a second exchange); 64 EP ranks with
    4 rows per peer of 32 rows of 14,352 bytes would pay 5.5 MB of slots for 0.5 MB of rows."""
    for rows in (8, 1000, 65536):
        assert slot_plan(2, 2064, rows, rows) == slot_bytes(2064, rows) > 0
    assert 2 * slot_bytes(2064, 1000) > max(SLOT_FLOOR, 2 * 1000 * 2064)       # the old rule's miss
    assert 64 * slot_bytes(14352, 4) > max(SLOT_FLOOR, 2 * slot_bytes(14352, 32))
    assert slot_plan(64, 14352, 4, 32) == 0
    assert slot_plan(8, 14352, 4, 32) == slot_bytes(14352, 4)                  # within SLOT_FLOOR


def test_rows_go_bare_from_2_mb_per_peer_or_whenever_the_op_can_with_emu_transport_bare(monkeypatch):
    """The slot of bare rows holds the header and one int32 of metadata per row of the bound (a
    multiple of 8 bytes); rows go bare when the op can and one peer's bounded rows carry 2 MiB
    (Bs 256 at H 7168: 256 rows of 14,336 bytes), 1 MiB in a 2-rank group, or always with
    EMU_TRANSPORT=bare."""
    monkeypatch.setenv("EMU_TRANSPORT", "auto")
    assert bare_slot(0) == HEADER_BYTES and bare_slot(1) == bare_slot(2) == HEADER_BYTES + 8
    assert bare_slot(256) == HEADER_BYTES + 1024
    big, small = SlotNeed(256, 2048, 14336, 256), SlotNeed(64, 512, 14336, 64)
    assert plan_slot(8, 14352, big) == (bare_slot(256), True)
    assert plan_slot(8, 14352, small) == (slot_plan(8, 14352, 64, 512), False)
    assert plan_slot(8, 14352, SlotNeed(256, 2048)) == (slot_plan(8, 14352, 256, 2048), False)   # cannot go bare
    assert plan_slot(2, 14352, small)[1] is False and plan_slot(2, 14352, SlotNeed(74, 74, 14336, 74))[1]   # a pair: 1 MiB
    monkeypatch.setenv("EMU_TRANSPORT", "bare")
    assert plan_slot(8, 14352, small) == (bare_slot(64), True)


def test_bare_metadata_words_sit_after_each_peers_header():
    """Peer p's words start right after its header in its slot; a peer with more rows than the
    slot holds keeps its first ones (``_kept``)."""
    slot = HEADER_BYTES + 16                                  # 4 words per peer
    first = HEADER_BYTES // 4
    words = _slot_words(np.array([2, 0, 6]), 4, slot)
    assert words.tolist() == [first, first + 1] + [2 * slot // 4 + first + i for i in range(4)]
    assert _kept(np.array([2, 0, 6]), 4).tolist() == [True, True, True, True, True, True, False, False]


def test_a_header_says_its_rows_come_bare():
    """The rows' route is one column: inline, later (packed) or later and bare."""
    for rides, inline, later, bare in (("inline", 1, 0, 0), ("later", 0, 1, 0), ("bare", 0, 1, 1), ("", 0, 0, 0)):
        out = Outgoing(op="combine", order=3, call_no=2, error=0, rows=np.array([1, 2]), row_bytes=8, clock_ns=0,
                       expect=np.array([2, 1]), origin=-1, attrs=(5,), inline=rides == "inline",
                       later=rides in ("later", "bare"), bare=rides == "bare")
        hdr = Header.decode(out.encode().numpy())
        assert (hdr.inline.tolist(), hdr.later.tolist(), hdr.bare.tolist()) == ([bool(inline)] * 2, [bool(later)] * 2,
                                                                                  [bool(bare)] * 2)
