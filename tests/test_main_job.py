"""The README's main job under torchrun, as a user runs it (8 processes)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flags", [["--removed", "dead", "--special"], ["--removed", "idle", "--h", "1024"]],
                         ids=["dead-special", "idle"])
def test_main_job_doc_example(flags):
    env = dict(os.environ, EMU_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8",
                           os.path.join(ROOT, "launch", "dispatch.py"), *flags],
                          capture_output=True, text=True, env=env, timeout=220)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "warm-up (every rank, no elastic_info): PASS: 8/8 ranks match the reference" in out, out
    assert f"removed, {flags[1]}): PASS: 4/4 ranks match the reference" in out, out
    # the survivors are old ranks 0, 1, 6, 7 with new ids 0..3
    survivors = [line.split()[:2] for line in out.splitlines()[-6:-1] if line.strip()[:1].isdigit()]
    assert survivors == [["0", "0"], ["1", "1"], ["6", "2"], ["7", "3"]], out
    if "--special" not in flags:
        assert out.count("[1.296875, 1.296875, 1.296875]") == 12, out    # bf16(0.3 + 1.0) everywhere


@pytest.mark.timeout(240)
def test_main_job_error_is_one_line_per_rank_and_a_summary():
    """A configuration error: one line per rank and one summary line, no rank's traceback."""
    env = dict(os.environ, EMU_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                           os.path.join(ROOT, "launch", "dispatch.py"), "--moe", "7", "--h", "1024"],
                          capture_output=True, text=True, env=env, timeout=220)
    assert proc.returncode != 0
    lines = proc.stdout.splitlines()
    rule = "moe_expert_num=7 violates: must be a multiple of ep_world_size - shared_expert_rank_num = 3"
    assert sorted(l.split(":")[0] for l in lines if l.startswith("rank ")) == [f"rank {r}" for r in range(4)], lines
    assert all(l.split(": ", 1)[1].startswith("AclnnError [561002]: ") and rule in l
               for l in lines if l.startswith("rank ")), lines
    assert [l for l in lines if l.startswith("FAIL:")] == [
        f"FAIL: 4 of 4 ranks raised: AclnnError [561002] aclnnMoeDistributeDispatchV3: {rule} (ranks 0-3)"], lines
    assert len(lines) == 5 and "emu/" not in proc.stderr, proc.stderr[-2000:]


def test_digest_check_finds_any_changed_bit_shape_or_dtype():
    """The main job checks each rank against digests of the reference (computed once): a
    flipped bit, a different shape or dtype in any output is named."""
    import torch
    from emu.testing.scenario import RankResult, Scenario, compare_digests, digests, run_reference
    want = run_reference(Scenario(ep=4, moe=3, h=1024, bs=4, k=2, seed=3))[2]
    ref = digests(want)
    assert compare_digests(want, ref) == []
    flipped = want.x_out.clone()
    flipped.view(torch.int16)[1, 5] ^= 1
    assert compare_digests(RankResult(dispatch=want.dispatch, x_out=flipped), ref) == ["x_out"]
    outs = list(want.dispatch)
    outs[4] = outs[4][:-1]
    outs[3] = outs[3].to(torch.int32)
    assert [d.split(":")[0] for d in compare_digests(RankResult(dispatch=tuple(outs), x_out=want.x_out), ref)] == \
        ["expert_token_nums", "ep_recv_counts"]
