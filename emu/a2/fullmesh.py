"""Atlas A2 (Ascend910B) fullmesh path of dispatch / combine (docs/atlas-a2.md).

Fullmesh moves tokens exactly as A3 does without shared experts (same expand_x layout, counts
and quantisation, the smooth row being the expert id), but its third output is the source-side
occurrence index ``occ[t*K + k]`` (how many earlier active slots of this rank chose the same
expert), and combine returns each row to its source by position: rows of block (l, p) go back
to p in order, and p reads slot (t, k) at ``windowOffset(e) + occ``, i.e. in its own slot order.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..a3 import combine as a3_combine
from ..a3 import dispatch as a3_dispatch
from ..comm.call import Call
from ..core.inputs import CombineInputs, DispatchInputs
from ..core.layout import DispatchOutputs
from ..core.plan import expand_idx
from ..core.request import Prepared


def dispatch(call: Call, prep: Prepared, inp: DispatchInputs) -> DispatchOutputs:
    """A2 fullmesh dispatch: the 7 outputs at torch_npu's eager shapes (docs/atlas-a2.md): assist
    holds occ (Bs*K entries written), ep_recv_counts has E entries (+ 2*G*K*(W/8) zero tail
    entries when expert_scales is given: torch_npu's allocation), expand_scales is not written."""
    out = a3_dispatch.dispatch(call, prep, inp)
    out.assist_info_for_combine.zero_()
    occ = expand_idx(inp.expert_ids, inp.x_active_mask, prep.cfg.moe_expert_num)
    n = int(prep.act.tokens.sum()) * inp.expert_ids.shape[1]
    out.assist_info_for_combine[:n] = occ[:n]
    return out


def combine(call: Call, prep: Prepared, inp: CombineInputs) -> torch.Tensor:
    """A2 fullmesh combine: rows back by position, out[t] = XT(sum_k fp32(y) * w) for active t
    (shared_expert_x is not read on A2)."""
    return a3_combine.combine(call, prep, replace(inp, positional=True, shared_expert_x=None))
