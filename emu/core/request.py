"""A request to run one op on this rank, and the validated form a chip runs.

``DispatchRequest`` / ``CombineRequest``: the input bundle, the attributes and where this
rank sits (its groups and ranks).  A chip's checks turn a request into :class:`Prepared`
(or an error, held in :class:`Checked` so that the rank can still tell its peers).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .attrs import Geometry, MoeConfig
from .errors import PARAM_INVALID, AclnnError
from .inputs import CombineInputs, DispatchInputs
from .layout import DispatchShapes
from .placement import Remap
from .plan import ActiveSet

_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Placement:
    """Where this rank sits: its EP (and TP) group, a ``ProcessGroup`` or its name, with the
    name the operator sees (``ep_name`` / ``tp_name``, "" for none), its rank in each, and the
    ``comm_alg`` it asked for."""

    group_ep: object
    ep_name: str
    ep_rank_id: int
    group_tp: object = ""
    tp_name: str = ""
    tp_rank_id: int = 0
    comm_alg: str = ""


@dataclass(frozen=True)
class DispatchRequest:
    inputs: DispatchInputs
    cfg: MoeConfig
    place: Placement
    op: str = "aclnnMoeDistributeDispatchV3"          # the operator's name in messages
    v1: bool = False                                  # torch_npu's V1 op (its allocation, expand_idx)
    kind = "dispatch"

    @property
    def activation(self) -> torch.Tensor:
        """The tensor whose dtype is the call's activation type (XT): x."""
        return self.inputs.x


@dataclass(frozen=True)
class CombineRequest:
    inputs: CombineInputs
    cfg: MoeConfig
    place: Placement
    op: str = "aclnnMoeDistributeCombineV3"
    kind = "combine"

    @property
    def activation(self) -> torch.Tensor:
        """The tensor whose dtype is the call's activation type (XT): expand_x."""
        return self.inputs.expand_x


Request = DispatchRequest | CombineRequest


@dataclass(frozen=True)
class Prepared:
    """A validated call.

    geom: the original geometry; remap: the elastic remap (identity without one); shapes: the
    eager output shapes; act: the active tokens / slots; me: this rank's logical EP id (its
    new id under elastic scaling); agreed: the attributes every rank must share; algorithm:
    the chip's path (A2: "fullmesh" or "hierarchy"; A3: "").
    """

    cfg: MoeConfig
    geom: Geometry
    xt: torch.dtype
    remap: Remap
    shapes: DispatchShapes
    act: ActiveSet
    me: int
    agreed: tuple[tuple[str, int], ...]
    algorithm: str = ""

    @property
    def route(self) -> Geometry:
        """Routing geometry (W', S', E' under active elastic scaling)."""
        return self.remap.routing(self.geom)


@dataclass(frozen=True)
class Checked:
    """The outcome of a chip's checks: ``prep`` or the ``error`` this rank reports to its peers."""

    prep: Prepared | None
    error: AclnnError | None


R = TypeVar("R", DispatchRequest, CombineRequest)


def attempt(check: Callable[[R], Prepared], req: R) -> Checked:
    """Run ``check(req)``; an AclnnError, or any other exception the checks meet on an input
    outside every contract (a list where a tensor belongs, a value no rule foresaw: 161002),
    becomes the error this rank reports: only the operator's errors leave an op call."""
    try:
        return Checked(check(req), None)
    except AclnnError as exc:
        return Checked(None, exc)
    except Exception as exc:  # noqa: BLE001 - reported as the operator's parameter error, type named
        return Checked(None, AclnnError(PARAM_INVALID, f"{req.kind}: malformed argument ({type(exc).__name__}: {exc})"))


def agreed_attributes(kind: str, cfg: MoeConfig, geom: Geometry, xt: torch.dtype,
                      elastic: torch.Tensor | None) -> tuple[tuple[str, int], ...]:
    """Attributes every rank of one call must share (carried in the call's first header)."""
    quant = ("quant_mode", cfg.quant_mode) if kind == "dispatch" else ("comm_quant_mode", cfg.comm_quant_mode)
    table = 0 if elastic is None else int(zlib.crc32(elastic.numpy().tobytes())) & 0x7FFFFFFF
    return (("ep_world_size", cfg.ep_world_size), ("tp_world_size", cfg.tp_world_size),
            ("moe_expert_num", cfg.moe_expert_num), ("shared_expert_num", geom.Ns),
            ("shared_expert_rank_num", cfg.shared_expert_rank_num), quant,
            ("global_bs (or Bs*ep_world_size)", geom.G), ("zero_expert_num", cfg.zero_expert_num),
            ("copy_expert_num", cfg.copy_expert_num), ("const_expert_num", cfg.const_expert_num),
            ("K (expert_ids.shape[1])", geom.K), ("H (hidden size)", geom.H),
            ("activation dtype (1 bf16, 2 fp16)", _DTYPE_CODE.get(xt, 0)), ("elastic_info (crc32)", table))
