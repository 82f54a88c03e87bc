"""The main job: the operator doc's example on any world, every rank checked bit for bit.

A plan (:func:`plan`) turns the launcher's options and the world size into the scenarios to
run, with defaults that fit the world: EP = world / tp, one shared expert on rank 0, one MoE
expert on every other rank, zero / copy / const experts, an elastic phase that removes the
middle of the MoE ranks (at most half of the ranks, keeping two MoE ranks), and K = 3 or the
MoE experts the elastic phase leaves, if fewer.  Options that
cannot work are one :class:`PlanError` before any rank starts; :func:`precheck` runs the
chip's own checks on rank 0's calls without communicating.  :func:`run_job` is one rank's
part: a warm-up on every rank, then the elastic phase on the survivors (removed ranks idle or
exit), each phase verified against the single-process reference and reported by its lowest
rank through the rendezvous store.  The lowest calling rank computes the reference once
and shares every rank's digests through the store; each rank checks its own outputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..chips import chip
from ..comm.context import disable_trace, enable_trace, mark
from ..comm.groups import group_name
from ..core.attrs import MoeConfig
from ..core.inputs import CombineInputs, DispatchInputs, SpecialExperts
from ..core.layout import dispatch_shapes
from ..core.ranks import who
from ..core.request import CombineRequest, DispatchRequest, Placement, attempt
from ..debug.trace import merge
from .scenario import Scenario, compare_digests, digests, rank_groups, run_rank, run_reference, summary

DOC_EXAMPLE = dict(shared=1, shared_ranks=1, bs=8, h=7168, zero=1, copy=1, const=1, data="doc", experts="identity")


class PlanError(ValueError):
    """Options that cannot make a job on this world, with the reason."""


@dataclass(frozen=True)
class JobPlan:
    """What the main job runs: the warm-up scenario (every rank), the EP ranks the elastic
    phase removes (empty: no elastic phase) and what they do, the trace directory, and notes on
    what the defaults chose."""

    scenario: Scenario
    removed: tuple[int, ...]
    removed_mode: str = "idle"
    trace: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def elastic(self) -> Scenario | None:
        return replace(self.scenario, removed=",".join(map(str, self.removed))) if self.removed else None


def _default_removed(ep: int, shared_ranks: int, local: int, k: int | None) -> tuple[int, ...]:
    """The middle of the MoE ranks: at most half of the EP ranks, keeping at least 2 MoE ranks
    and, when K is given, K MoE experts."""
    keep = max(2, -(-k // local)) if k else 2
    n = max(0, min(ep // 2, (ep - shared_ranks) - keep))
    start = max(shared_ranks, (ep - n) // 2)
    return tuple(range(start, start + n))


def plan(world: int, options: dict) -> JobPlan:
    """The job of ``options`` (the Scenario's fields but ep / removed, plus special, removed
    (what removed ranks do: idle or dead), removed_ranks, no_elastic, trace; None: the default
    for this world) on ``world`` ranks."""
    o = {k: v for k, v in options.items() if v is not None}
    fields = {f.name: f.default for f in dataclasses.fields(Scenario)}
    fields.update(DOC_EXAMPLE)
    fields.update({k: v for k, v in o.items() if k in fields and k not in ("ep", "removed", "elastic_flag0")})
    soc = fields["soc"] = fields["soc"].upper()
    tp = 2 if fields["tp"] == 2 else 1
    if world < 2 or world % tp or world // tp < 2:
        raise PlanError(f"{world} ranks cannot make an EP group" + (" with --tp 2 (an even world of >= 4 ranks)"
                                                                        if tp == 2 else " (at least 2 ranks)"))
    ep = fields["ep"] = world // tp
    notes = []
    if soc == "A2":
        if ep % 8 or ep < 16:
            raise PlanError(f"--soc a2 needs a multiple of 8 ranks, at least 16 (got {world})")
        for name in ("shared_ranks", "zero", "copy", "const"):
            fields[name] = o.get(name, 0) if name not in DOC_EXAMPLE else 0
        fields["comm_alg"] = fields["comm_alg"] or "fullmesh"
        fields["tp"] = 0
    S = fields["shared_ranks"]
    if "moe" not in o:
        fields["moe"] = max(ep - S, 1)
    E = fields["moe"]
    valid = 0 <= S < ep and E % (ep - S) == 0               # else the operator's checks will say why
    local = E // (ep - S) if valid else 1
    removed = _removed(o, ep, S, local, o.get("k"), soc, tp, notes) if valid else ()
    if "k" not in o:                                        # the doc's 3, or what the elastic phase leaves
        fields["k"] = max(1, min(3, E, (ep - S - len(removed)) * local))
    K = fields["k"]
    if not 1 <= K <= E:
        raise PlanError(f"--k {K}: every token picks K distinct MoE experts, 1 <= K <= E = {E}")
    if options.get("special"):
        fields["special_frac"] = 1.0
    sc = Scenario(**fields)
    return JobPlan(sc, removed, o.get("removed", "idle"), o.get("trace"), tuple(notes))


def _removed(o: dict, ep: int, S: int, local: int, K: int | None, soc: str, tp: int, notes: list) -> tuple[int, ...]:
    """The elastic phase's removed EP ranks, checked: MoE ranks only, some survive, >= K experts
    left (K None: not chosen yet)."""
    given = o.get("removed_ranks")
    if o.get("no_elastic"):
        return ()
    if soc == "A2" or tp == 2:
        if given:
            raise PlanError("--removed-ranks: elastic scaling is not supported " + ("on Atlas A2" if soc == "A2"
                                                                                    else "with --tp 2"))
        return ()
    if not given:
        removed = _default_removed(ep, S, local, K)
        if not removed:
            notes.append(f"no elastic phase: EP {ep} has too few MoE ranks to remove one")
        return removed
    try:
        removed = tuple(sorted({int(r) for r in str(given).split(",") if r.strip()}))
    except ValueError:
        raise PlanError(f"--removed-ranks {given!r}: a comma-separated list of EP ranks") from None
    bad = [r for r in removed if not S <= r < ep]
    if bad:
        raise PlanError(f"--removed-ranks: {bad} are not MoE ranks (the MoE ranks are {S}-{ep - 1}"
                        + (f"; {who(list(range(S)))} host{'s' if S == 1 else ''} the shared experts" if S else "")
                        + ")")
    left = (ep - S - len(removed)) * local
    if left < max(K or 1, 1):
        raise PlanError(f"--removed-ranks {given}: {left} MoE experts would survive, fewer than K = {K or 1}")
    return removed


def precheck(p: JobPlan) -> str | None:
    """The chip's own checks of rank 0's dispatch and combine in this plan (no communication):
    the operator's error message, or None."""
    sc = p.scenario
    cfg = sc.config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sc.rank_bs(0), sc.h, generator=g).to(sc.xt)
    ids = torch.arange(sc.k, dtype=torch.int32).repeat(x.shape[0], 1)
    place = Placement(group_ep="", ep_name="emu_hccl_check", ep_rank_id=0,
                      tp_name="emu_hccl_tp" if sc.tp == 2 else "", comm_alg=sc.comm_alg)
    on = chip(sc.soc)
    from_dispatch = attempt(on.check_dispatch, on.adapt(DispatchRequest(_dispatch_inputs(sc, x, ids), cfg, place)))
    if from_dispatch.error is not None:
        return str(from_dispatch.error)
    shapes = dispatch_shapes(from_dispatch.prep.geom, 0, x.shape[0])
    comb = CombineInputs(expand_x=torch.zeros(shapes.rows, sc.h, dtype=sc.xt), expert_ids=ids,
                         assist_info=torch.zeros(shapes.assist, dtype=torch.int32),
                         ep_send_counts=torch.zeros(max(shapes.ep_recv, 1), dtype=torch.int32),
                         expert_scales=torch.ones(ids.shape), special=_special(sc, cfg, x),
                         tp_send_counts=torch.zeros(sc.tp, dtype=torch.int32) if sc.tp == 2 else None,
                         expand_scales=torch.zeros(shapes.capacity) if sc.hierarchy else None)
    checked = attempt(on.check_combine, on.adapt(CombineRequest(comb, cfg, place)))
    return str(checked.error) if checked.error is not None else None


def _dispatch_inputs(sc: Scenario, x: torch.Tensor, ids: torch.Tensor) -> DispatchInputs:
    return DispatchInputs(x=x, expert_ids=ids, expert_scales=torch.ones(ids.shape) if sc.hierarchy else None,
                          scales=torch.ones(sc.config().shared_num + sc.moe, sc.h) if sc.quant == 2 and sc.smooth
                          else None)


def _special(sc: Scenario, cfg: MoeConfig, x: torch.Tensor) -> SpecialExperts:
    ori = x if sc.copy or sc.const else None
    alphas = torch.ones(sc.const, dtype=sc.xt) if sc.const else None
    return SpecialExperts.of(cfg, ori, alphas, alphas, torch.ones(sc.const, sc.h, dtype=sc.xt) if sc.const else None)


def _phase(sc: Scenario, label: str, store, groups: tuple[str, str], say: Callable[[str], None]) -> bool:
    """Run ``sc`` on the ranks that call the op, verify each, report through the store; the
    lowest calling rank prints the table.  Returns whether every calling rank matched."""
    me = dist.get_rank()
    callers = sc.survivors()
    got = run_rank(sc, me, *groups)
    row = summary(sc, me, got, compare_digests(got, _expected(sc, label, store, me == callers[0])[me]))
    store.set(f"emu_main/{label}/{me}", json.dumps(row))
    if me == callers[0]:
        rows = [json.loads(store.get(f"emu_main/{label}/{g}")) for g in callers]
        calls = f", {sc.calls} calls each" if sc.calls > 1 else ""
        say(f"\n== {label}: {len(callers)} ranks call the op{calls}: {callers}")
        say(f"{'rank':>4} {'id':>3} {'role':>6} {'expert_token_nums':>18} {'ep_recv_counts (head)':>26} "
            f"{'first triples':>28} {'x_out[0,:3]':>28} {'ms':>6}  verdict")
        for r in rows:
            say(f"{r['rank']:>4} {r['id']:>3} {r['role']:>6} {str(r['token_nums']):>18} {r['counts']:>26} "
                f"{r['triples']:>28} {str(r['x_out']):>28} {r['ms']:>6.1f}  {r['verdict']}")
        ok = all(r["ok"] for r in rows)
        say(f"{label}: {'PASS' if ok else 'FAIL'}: {sum(r['ok'] for r in rows)}/{len(rows)} ranks match the reference")
        store.set(f"emu_main/{label}/verdict", "1" if ok else "0")
    store.wait([f"emu_main/{label}/verdict"], timedelta(seconds=float(os.environ.get("EMU_TIMEOUT_S", "60"))))
    return store.get(f"emu_main/{label}/verdict") == b"1"


def _expected(sc: Scenario, label: str, store, compute: bool) -> dict[int, dict[str, str]]:
    """The reference's digests of every calling rank's outputs: computed once, by the rank with
    ``compute``, and shared through the store (each rank then checks only its own)."""
    callers = sc.survivors()
    if compute:
        want = run_reference(sc)
        for g in callers:
            store.set(f"emu_main/{label}/want/{g}", json.dumps(digests(want[g])))
    me = dist.get_rank()
    key = f"emu_main/{label}/want/{me}"
    store.wait([key], timedelta(seconds=max(60.0, float(os.environ.get("EMU_TIMEOUT_S", "60")))))
    return {me: json.loads(store.get(key))}


def run_job(p: JobPlan, say: Callable[[str], None] = print) -> bool:
    """This rank's part of the job (under torchrun); True only if every phase matched."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("EMU_TIMEOUT_S", "60"))))
    me = dist.get_rank()
    sc = p.scenario
    os.environ["EMU_SOC"] = sc.soc
    if me == 0:
        for note in p.notes:
            say(f"note: {note}")
    if p.trace:
        enable_trace(p.trace)
    store = c10d._get_default_store()
    ep_group, tp_group = rank_groups(sc)
    groups = (group_name(ep_group), group_name(tp_group) if tp_group is not None else "")
    del ep_group, tp_group                  # no group object may outlive destroy_process_group()
    mark("warm-up")
    calls = f", {sc.calls} calls each" if sc.calls > 1 else ""
    ok = _phase(sc, f"warm-up (every rank, no elastic_info{calls})", store, groups, say)
    elastic = p.elastic
    label = f"elastic (ranks {','.join(map(str, p.removed))} removed, {p.removed_mode})"
    callers = elastic.survivors() if elastic is not None else list(range(dist.get_world_size()))
    if elastic is not None and me in callers:
        mark("elastic")
        ok = _phase(elastic, label, store, (groups[0], ""), say) and ok
    elif elastic is not None and p.removed_mode == "dead":
        say(f"rank {me}: removed, exiting with code 0")
        os._exit(0)
    elif elastic is not None:
        store.wait([f"emu_main/{label}/verdict"], timedelta(seconds=float(os.environ.get("EMU_TIMEOUT_S", "60"))))
        ok = store.get(f"emu_main/{label}/verdict") == b"1" and ok
    if p.trace:
        disable_trace()
        store.set(f"emu_main/traced/{me}", "1")
        if me == 0:
            store.wait([f"emu_main/traced/{g}" for g in callers])
            say(f"\ntrace: {merge(p.trace)} (mc2-emu report {p.trace})")
    time.sleep(0.05)
    dist.destroy_process_group()
    return ok


__all__ = ["JobPlan", "PlanError", "plan", "precheck", "run_job"]
