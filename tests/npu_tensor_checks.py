"""Checks of npu tensors, RNG, device identity and "hccl" groups after ``emu.npu.install()``,
run in a process of their own (install changes torch for the whole process): prints one JSON
object, check name -> "ok" or the failure's traceback.  Driven by tests/test_npu_tensors.py."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

import emu
import emu.npu
from script_checks import raises, registry, run_all

torch_npu = None                      # main() installs (not on import: the test only reads the names)
CHECKS = {}


check = registry(CHECKS)


@check
def moves_and_factories():
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    y = x.npu()
    assert y.device == torch.device("npu", 0) and y.is_npu and not y.is_cpu
    assert torch.equal(y.cpu(), x) and type(y.cpu()) is torch.Tensor and y.cpu().device.type == "cpu"
    assert x.to("npu:3").device == torch.device("npu", 3) and x.to("npu").device.type == "npu"
    assert y.to("npu") is y
    assert torch.equal(x.npu(2).cpu(), x) and x.npu(2).device.index == 2
    for t, want in ((torch.zeros(2, 3, device="npu:1"), torch.zeros(2, 3)),
                    (torch.ones(4, device="npu", dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)),
                    (torch.full((2,), 7, device="npu"), torch.full((2,), 7)),
                    (torch.arange(5, device="npu"), torch.arange(5)),
                    (torch.tensor([[1, 2], [3, 4]], device="npu"), torch.tensor([[1, 2], [3, 4]])),
                    (torch.empty_like(y).zero_(), torch.zeros(2, 3)),
                    (y.new_ones(3), torch.ones(3))):
        assert t.device.type == "npu", t.device
        assert t.dtype == want.dtype and torch.equal(t.cpu(), want), (t, want)
    assert torch.zeros(2, device="npu:1").device.index == 1


@check
def current_device_places_tensors():
    torch.npu.set_device(5)
    try:
        assert torch.npu.current_device() == 5
        assert torch.ones(2).npu().device == torch.device("npu", 5)
        assert torch.zeros(2, device="npu").device == torch.device("npu", 5)
        with torch.npu.device(2):
            assert torch.ones(1).npu().device.index == 2
        assert torch.npu.current_device() == 5
    finally:
        torch.npu.set_device(0)


@check
def ops_follow_the_cpu():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, generator=g), torch.randn(5, 3, generator=g)
    an, bn = a.npu(), b.npu()
    for got, want in ((an @ bn, a @ b), (an * 2 + 1, a * 2 + 1), (an.sum(0), a.sum(0)), (an[1:3, ::2], a[1:3, ::2]),
                      (torch.cat([an, an]), torch.cat([a, a])), (an.softmax(-1), a.softmax(-1)),
                      (an.bfloat16(), a.bfloat16()), (torch.topk(an, 2).indices, torch.topk(a, 2).indices)):
        assert got.device.type == "npu" and got.dtype == want.dtype and torch.equal(got.cpu(), want), (got, want)
    assert an.sum().item() == a.sum().item() and an.tolist() == a.tolist()
    c = an.clone()
    same = c.add_(1)
    assert same is c and torch.equal(c.cpu(), a + 1)
    view = c[0]
    view.zero_()
    assert not c.cpu()[0].any(), "a view shares its base's memory"
    host = torch.zeros(4, 5)
    back = host.copy_(an)                                           # device to host: the CPU tensor itself
    assert back is host and torch.equal(host, a)
    mixed = an + torch.ones(5)                                      # the device refuses this; mc2-emu allows it
    assert mixed.device.type == "npu"


@check
def autograd_on_npu0():
    w = torch.tensor([1.0, 2.0, 3.0], device="npu", requires_grad=True)
    (w * w).sum().backward()
    assert w.grad.device.type == "npu" and torch.equal(w.grad.cpu(), torch.tensor([2.0, 4.0, 6.0]))


@check
def numpy_needs_cpu_first():
    raises(TypeError, "cpu()", lambda: torch.ones(2).npu().numpy())


@check
def rng_seeding():
    torch.manual_seed(0)                               # seeds the CPU and the npu streams, no recursion
    a = torch.randn(8, device="npu")
    torch.manual_seed(0)
    b = torch.randn(8, device="npu")
    assert torch.equal(a.cpu(), b.cpu())
    torch.npu.manual_seed(1)
    c = torch.rand(5, device="npu")
    assert torch.equal(c.cpu(), torch.rand(5, generator=torch.Generator().manual_seed(1)))   # same algorithm
    torch.npu.manual_seed_all(1)
    assert torch.equal(torch.rand(5, device="npu").cpu(), c.cpu())
    torch.manual_seed(5)
    cpu_first = torch.rand(3)
    torch.manual_seed(5)
    torch.rand(3, device="npu")                        # draws from the npu stream only
    assert torch.equal(torch.rand(3), cpu_first)
    torch.npu.manual_seed(7)
    state = torch.npu.get_rng_state()
    d = torch.randn(3, device="npu")
    torch.npu.set_rng_state(state)
    assert torch.equal(torch.randn(3, device="npu").cpu(), d.cpu()) and torch.npu.initial_seed() == 7


@check
def generators_on_npu():
    g = torch.Generator(device="npu")
    assert g.device.type == "npu" and isinstance(g, torch.Generator) and isinstance(torch.default_generator, torch.Generator)
    g.manual_seed(11)
    a = torch.randn(4, generator=g, device="npu")
    g.manual_seed(11)
    assert torch.equal(torch.randn(4, generator=g, device="npu").cpu(), a.cpu())
    assert torch.Generator().device.type == "cpu"


@check
def device_identity_per_soc():
    for soc, name, code, count in (("A3", "Ascend910_93", 250, 16), ("A2", "Ascend910B", 223, 8)):
        os.environ["EMU_SOC"] = soc
        try:
            assert torch.npu.get_device_name().startswith(name) and torch_npu.npu.get_device_name(0).startswith(name)
            assert torch_npu.npu.get_soc_version() == code and torch.npu.device_count() == count
            assert torch.npu.get_device_properties(0).name == torch.npu.get_device_name()
        finally:
            os.environ.pop("EMU_SOC")
    os.environ["LOCAL_WORLD_SIZE"] = "4"
    assert torch.npu.device_count() == 4
    os.environ["EMU_NPU_DEVICE_COUNT"] = "32"
    assert torch.npu.device_count() == 32
    del os.environ["LOCAL_WORLD_SIZE"], os.environ["EMU_NPU_DEVICE_COUNT"]
    raises(RuntimeError, "device_count", lambda: torch.npu.set_device(16))       # 16 devices: 0-15


@check
def emulated_ops_take_npu_tensors():
    x = torch.randn(3, 8).bfloat16()
    got = torch_npu.npu_swiglu(x.npu())
    assert got.device.type == "npu" and torch.equal(got.cpu(), torch_npu.npu_swiglu(x))
    y, s = torch_npu.npu_dynamic_quant(x.npu(3))
    y0, s0 = torch_npu.npu_dynamic_quant(x)
    assert y.device == torch.device("npu", 3) and torch.equal(y.cpu(), y0) and torch.equal(s.cpu(), s0)


@check
def operators_are_the_dispatcher_ops():
    from emu.npu import registry
    for e in registry.ENTRIES:
        assert getattr(torch_npu, e.base) is getattr(torch.ops.npu, e.base), e.name
    x = torch.randn(2, 1024).bfloat16().npu()
    ids = torch.zeros(2, 1, dtype=torch.int32).npu()
    # as in torch_npu, group_ep is a str: a ProcessGroup object is refused by the schema, before any check
    raises(RuntimeError, "group_ep", lambda: torch_npu.npu_moe_distribute_dispatch_v2(x, ids, object(), 2, 0, 2))


@check
def histc_counts_integer_tensors_as_the_npu():
    ids = torch.tensor([[0, 3], [3, 1], [7, 3]], dtype=torch.int32)
    for dtype in (torch.int32, torch.int64, torch.uint8):
        got = torch.histc(ids.to(dtype).npu(), bins=8, min=0, max=8)
        assert got.device.type == "npu" and got.dtype == dtype, (got.device, got.dtype)
        assert got.cpu().tolist() == [1, 1, 0, 3, 0, 0, 0, 1], got
    out = torch.empty(4, dtype=torch.int32).npu()
    torch.histc(ids.npu(), bins=4, min=0, max=8, out=out)               # bins of width 2: [0, 2) ... [6, 8]
    assert out.cpu().tolist() == [2, 3, 0, 1], out
    floats = torch.tensor([0.5, 1.5, 1.5])
    assert torch.equal(torch.histc(floats.npu(), bins=2, min=0, max=2).cpu(), torch.histc(floats, bins=2, min=0, max=2))
    raises(RuntimeError, "not implemented", lambda: torch.histc(ids, bins=8, min=0, max=8))   # the CPU's own refusal
    fast = torch.compile(lambda t: torch.histc(t, bins=8, min=0, max=8) * 2, fullgraph=True, backend="aot_eager")
    assert fast(ids.npu()).cpu().tolist() == [2, 2, 0, 6, 0, 0, 0, 2]


def _routed_mlp(x, gate, w1, w2, k: int):
    """gating -> init_routing_v2 -> grouped matmul -> swiglu -> grouped matmul -> unpermute, all torch.ops.npu."""
    npu = torch.ops.npu
    probs, ids, _ = npu.npu_moe_gating_top_k_softmax(x @ gate, k=k)
    rows, row_idx, counts, _ = npu.npu_moe_init_routing_v2(x, ids, active_num=ids.numel(), expert_num=w1.shape[0],
                                                           expert_tokens_num_type=1, expert_tokens_num_flag=True)
    h = npu.npu_grouped_matmul([rows], [w1], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]
    y = npu.npu_grouped_matmul([npu.npu_swiglu(h)], [w2], group_list=counts, split_item=2, group_type=0,
                               group_list_type=1)[0]
    return npu.npu_moe_token_unpermute(y, row_idx, probs)


@check
def graph_capture_of_routing_and_compute_ops():
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(64, 8, generator=g).bfloat16().npu()
    w1 = (torch.randn(8, 64, 32, generator=g) / 8).bfloat16().npu()
    w2 = (torch.randn(8, 16, 64, generator=g) / 4).bfloat16().npu()
    counter = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(_routed_mlp, fullgraph=True, backend=counter)
    for step in range(3):
        x = torch.randn(6, 64, generator=g).bfloat16().npu()
        eager, graph = _routed_mlp(x, gate, w1, w2, 2), fast(x, gate, w1, w2, 2)
        assert graph.device == x.device and (graph.shape, graph.dtype) == ((6, 64), torch.bfloat16)
        assert torch.equal(eager.cpu(), graph.cpu()), step
    assert counter.frame_count == 1, counter.frame_count          # new data of the same shapes: the same graph


@check
def hccl_groups_run_gloo():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1] if len(sys.argv) > 1 else "29531")
    dist.init_process_group("hccl", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "hccl" and dist.is_hccl_available()
        sub = dist.new_group([0], backend="hccl")
        t = torch.ones(4).npu()
        dist.all_reduce(t, group=sub)
        assert t.device.type == "npu" and torch.equal(t.cpu(), torch.ones(4))
        out = torch.empty(4, device="npu")
        dist.all_to_all_single(out, torch.arange(4.0).npu())
        assert torch.equal(out.cpu(), torch.arange(4.0))
        for pg in (dist.group.WORLD, sub):
            name = pg._get_backend(torch.device("npu")).get_hccl_comm_name(0)
            assert name == emu.group_name(pg), name
        ref = torch.ones(2).npu()
        flag = torch_npu._npu_distribute_barrier(ref, emu.group_name(sub), 1)
        assert torch.equal(flag.cpu(), ref.cpu()) and flag.device.type == "npu" and flag.data_ptr() != ref.data_ptr()
        del pg, sub
    finally:
        dist.destroy_process_group()


@check
def streams_events_and_gloo_pairs():
    """The device module's no-op streams, the accelerator, stubs, and groups made with
    "cpu:gloo,npu:gloo" naming themselves as "hccl" groups do."""
    import torch_npu as imported
    assert imported is torch_npu and torch.npu.is_available()
    torch.npu.set_device("npu:0")
    assert torch.npu.current_device() == 0
    s = torch.npu.Stream()
    e = torch.npu.current_stream().record_event()
    with torch.npu.stream(s):
        s.wait_event(e)
    torch.npu.synchronize()
    assert torch.accelerator.current_accelerator().type == "npu"
    assert not hasattr(torch_npu, "no_such_attribute")
    raises(NotImplementedError, "not emulated", lambda: torch_npu.npu_no_such_op(1))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(int(sys.argv[1]) + 1 if len(sys.argv) > 1 else 29532))
    dist.init_process_group("cpu:gloo,npu:gloo", rank=0, world_size=1)
    try:
        dist.barrier()
        pg = dist.group.WORLD
        assert pg._get_backend(torch.device("npu")).get_hccl_comm_name(0) == emu.group_name(pg)
        del pg
    finally:
        dist.destroy_process_group()


@check
def operator_test_module():
    """torch_npu.testing as Ascend's operator tests use it (run on A3, the default chip)."""
    import unittest

    import numpy as np
    from torch_npu.testing.common_distributed import skipIfUnsupportMultiNPU
    from torch_npu.testing.common_utils import SupportedDevices, create_common_tensor
    from torch_npu.testing.testcase import TestCase

    cpu, npu = create_common_tensor([np.float16, -1, [3, 4]], -1, 1)
    assert cpu.dtype == torch.float16 and npu.device == torch.device("npu", 0) and torch.equal(npu.cpu(), cpu)
    assert ((cpu >= -1) & (cpu <= 1)).all()

    class Probe(TestCase):
        @SupportedDevices(["Ascend910_93"])
        def test_on_a3(self):
            x = torch.randn(64).half()
            self.assertRtolEqual(x, x + 1e-4)                     # within fp16's 1e-3
            self.assertRtolEqual(x.bfloat16(), x.bfloat16())
            self.assertEqual(torch.ones(3).npu(), torch.ones(3) + 1e-6)
            self.assertEqual([1, 2.0], [1, 2.0])
            with self.assertRaises(AssertionError):
                self.assertRtolEqual(torch.ones(64), torch.ones(64) * 1.1)
            with self.assertRaises(AssertionError):
                self.assertEqual(torch.ones(3), torch.zeros(3))

        @SupportedDevices(["Ascend910B"])
        def test_on_a2(self):
            raise AssertionError("ran on the wrong chip")

        @skipIfUnsupportMultiNPU(32)
        def test_32_devices(self):
            raise AssertionError("ran with 16 devices")

    result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(Probe))
    assert result.testsRun == 3 and not result.failures and not result.errors, (result.failures, result.errors)
    assert len(result.skipped) == 2, result.skipped


def main() -> None:
    global torch_npu
    torch_npu = emu.npu.install()
    print(json.dumps(run_all(CHECKS)))


if __name__ == "__main__":
    main()
