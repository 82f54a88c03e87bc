"""An MC2 test written as Ascend's operator examples are, against torch_npu only: 16 ranks
spawned with torch.multiprocessing, "hccl" process groups, ``torch.npu.set_device(rank)``,
``.npu()`` inputs, goldens from the MoE routing operators in the parent, results back through
a queue.  It picks its cases from the chip it runs on (Ascend910_93: A3, tp 2 and a shared
expert rank; Ascend910B: A2 fullmesh and hierarchy), V1 and V2 each.

    EMU_SOC=A2 python -m emu.npu.run tests/npu_example_style.py     # unchanged on mc2-emu
"""
import os
import queue
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch_npu

WORLD, BS, H, K = 16, 8, 2048, 4
SHARED_SCALE = 0.5


def chip():
    name = torch_npu.npu.get_device_name()
    if name.startswith("Ascend910_93"):
        return "A3"
    if name.startswith("Ascend910B"):
        return "A2"
    raise unittest.SkipTest(f"MC2 needs Atlas A2 or A3, not {name}")


def cases(soc):
    """(name, ep, tp, shared expert ranks, MoE experts, comm_alg)."""
    if soc == "A3":
        return [("tp2", 8, 2, 0, 8, ""), ("shared", 16, 1, 1, 15, "")]
    return [("fullmesh", 16, 1, 0, 16, "fullmesh"), ("hierarchy", 16, 1, 0, 32, "hierarchy")]


def expert_scale(e):
    return 1.0 + (e % 4) * 0.25


def init_dist(rank):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "50000")
    torch_npu.npu.set_device(rank if chip() == "A3" else rank % 8)
    dist.init_process_group(backend="hccl", world_size=WORLD, rank=rank)


def make_groups(rank, ep, tp):
    """This rank's EP group (ranks i, i + tp, ...) and, with tp 2, its TP group (2e, 2e + 1)."""
    ep_group = tp_group = None
    for i in range(tp):
        g = dist.new_group(backend="hccl", ranks=list(range(i, WORLD, tp)))
        if rank % tp == i:
            ep_group = g
    if tp == 2:
        for e in range(ep):
            g = dist.new_group(backend="hccl", ranks=[2 * e, 2 * e + 1])
            if rank // 2 == e:
                tp_group = g
    return ep_group, tp_group


def scale_runs(rows, counts, scales):
    """Consecutive runs of ``rows`` (counts[i] rows each) times scales[i], rounded to the rows'
    dtype; rows after the runs are zero."""
    out = torch.zeros_like(rows)
    start = 0
    for n, s in zip(counts, scales):
        out[start:start + n] = (rows[start:start + n].float() * s).to(rows.dtype)
        start += n
    return out


def experts(expand_x, counts, ep_rank, shared, local, tp_rank):
    """Expert e multiplies its rows by expert_scale(e); the shared expert by SHARED_SCALE.
    With tp 2, TP rank 0 computes the rows and TP rank 1 contributes zeros."""
    if tp_rank == 1:
        return torch.zeros_like(expand_x)
    if ep_rank < shared:
        return scale_runs(expand_x, [int(counts.sum())], [SHARED_SCALE])
    first = (ep_rank - shared) * local
    return scale_runs(expand_x, counts.tolist(), [expert_scale(first + j) for j in range(local)])


def run_rank(rank, all_cases, c2p, p2c):
    init_dist(rank)
    results = {case[0]: run_case(rank, case, *inputs) for case, inputs in all_cases}
    c2p.put((rank, results))
    p2c.get()
    dist.destroy_process_group()


def run_case(rank, case, x_all, ids_all, w_all):
    name, ep, tp, shared, moe, alg = case
    ep_group, tp_group = make_groups(rank, ep, tp)
    ep_name = ep_group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
    tp_name = tp_group._get_backend(torch.device("npu")).get_hccl_comm_name(rank) if tp == 2 else ""
    ep_rank, tp_rank = rank // tp, rank % tp
    local = moe // (ep - shared)
    x, ids, w = x_all[rank].npu(), ids_all[rank].npu(), w_all[rank].npu()
    common = dict(group_ep=ep_name, ep_world_size=ep, ep_rank_id=ep_rank, moe_expert_num=moe,
                  shared_expert_rank_num=shared, group_tp=tp_name, tp_world_size=tp, tp_rank_id=tp_rank)
    out = {}
    for version in ("v2", "v1"):
        if version == "v1" and alg == "hierarchy":
            continue
        extra = dict(comm_alg=alg) if version == "v2" else {}
        if alg == "hierarchy":
            extra["expert_scales"] = w
        dispatch = torch_npu.npu_moe_distribute_dispatch_v2 if version == "v2" else torch_npu.npu_moe_distribute_dispatch
        expand_x, _, assist, counts, ep_recv, tp_recv, expand_scales = dispatch(x=x, expert_ids=ids, **common, **extra)
        y = experts(expand_x, counts, ep_rank, shared, local, tp_rank)
        combine_args = dict(expand_x=y, expert_ids=ids, ep_send_counts=ep_recv, expert_scales=w, tp_send_counts=tp_recv,
                            **common)
        if version == "v2":
            x_out = torch_npu.npu_moe_distribute_combine_v2(assist_info_for_combine=assist, comm_alg=alg,
                                                            expand_scales=expand_scales, **combine_args)
        else:
            if chip() == "A2":
                assist = assist[:BS * K].view(BS, K)        # A2 reads expand_idx in any shape
            x_out = torch_npu.npu_moe_distribute_combine(expand_idx=assist, **combine_args)
        assert x_out.device == x.device and expand_x.device.type == "npu"
        out[version] = (expand_x.cpu(), counts.cpu(), x_out.cpu())
    return out


def golden(case, x_all, ids_all, w_all):
    """Per world rank: the rows it receives (in order) and x_out, from the routing operators."""
    name, ep, tp, shared, moe, alg = case
    local = moe // (ep - shared)
    rows, x_out = {}, {}
    for i in range(tp):
        members = list(range(i, WORLD, tp))
        x = torch.cat([x_all[r] for r in members])
        ids = torch.cat([ids_all[r] for r in members])
        w = torch.cat([w_all[r] for r in members])
        n = x.shape[0]
        row_idx = torch.arange(n * K, dtype=torch.int32).view(K, n).t().contiguous()
        ex, ex_row, ex_expert = torch_npu.npu_moe_init_routing(x.npu(), row_idx=row_idx.npu(), expert_idx=ids.npu(),
                                                                active_num=n)
        ex, ex_row, ex_expert = ex.cpu(), ex_row.cpu(), ex_expert.cpu()
        ends = torch_npu.npu_moe_compute_expert_tokens(ex_expert.npu(), moe).cpu().tolist()
        starts = [0] + ends[:-1]
        scaled = scale_runs(ex, [e - s for s, e in zip(starts, ends)], [expert_scale(e) for e in range(moe)])
        skip = (x.float() * SHARED_SCALE).to(x.dtype) if shared else None
        y = torch_npu.npu_moe_finalize_routing(scaled.npu(), skip.npu() if skip is not None else None, None, None,
                                               w.npu(), ex_row.npu(), ex_expert.npu()).cpu()
        for ep_rank, r in enumerate(members):
            x_out[r] = y[ep_rank * BS:(ep_rank + 1) * BS]
            if ep_rank < shared:
                rows[r] = torch.cat([x_all[m] for j, m in enumerate(members) if j % shared == ep_rank])
            else:
                first = (ep_rank - shared) * local
                rows[r] = ex[starts[first]:ends[first + local - 1]]
    if tp == 2:
        rows = {r: torch.cat([rows[r], rows[r ^ 1]]) for r in rows}
    return rows, x_out


def make_inputs(moe):
    x_all = [torch.randn(BS, H).to(torch.bfloat16) for _ in range(WORLD)]
    gating = [torch.randn(BS, moe) for _ in range(WORLD)]
    routed = [torch_npu.npu_moe_gating_top_k_softmax(g.npu(), None, k=K) for g in gating]
    return x_all, [r[1].cpu().int() for r in routed], [r[0].cpu().float() for r in routed]


class TestMoeDistributeExampleStyle(unittest.TestCase):

    def run_world(self, all_cases):
        ctx = mp.get_context("spawn")
        c2p, p2c = ctx.Queue(WORLD), ctx.Queue(WORLD)
        procs = [ctx.Process(target=run_rank, args=(r, all_cases, c2p, p2c)) for r in range(WORLD)]
        for p in procs:
            p.start()
        results = {}
        while len(results) < WORLD:
            try:
                rank, out = c2p.get(timeout=1)
                results[rank] = out
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    for p in procs:
                        p.kill()
                    self.fail(f"ranks {dead} exited before answering")
        for _ in range(WORLD):
            p2c.put(0)
        for p in procs:
            p.join(timeout=120)
            self.assertEqual(p.exitcode, 0)
        return results

    def test_dispatch_combine(self):
        soc = chip()
        torch.manual_seed(0)
        all_cases = [(case, make_inputs(case[4])) for case in cases(soc)]
        results = self.run_world(all_cases)
        for case, inputs in all_cases:
            rows, x_out = golden(case, *inputs)
            checked = 0
            for rank in range(WORLD):
                for version, (expand_x, counts, out) in results[rank][case[0]].items():
                    where = f"{soc} {case[0]} {version} rank {rank}"
                    if case[5] != "hierarchy":
                        n = rows[rank].shape[0]
                        self.assertTrue(torch.equal(expand_x[:n], rows[rank]), where + ": expand_x")
                    torch.testing.assert_close(out.float(), x_out[rank].float(), rtol=1e-2, atol=1e-2,
                                               msg=lambda m: f"{where}: x_out\n{m}")
                    checked += 1
            print(f"{soc} {case[0]}: 16 ranks, {checked} dispatch + combine checked", flush=True)


if __name__ == "__main__":
    unittest.main()
