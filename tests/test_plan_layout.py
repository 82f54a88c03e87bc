"""The distributed path's pure pieces on the docs/dispatch.md world, worked by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emu.core.attrs import Geometry
from emu.core.layout import dispatch_shapes, expert_token_nums, recv_layout
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
