"""Checks of npu tensors crossing processes (torch.multiprocessing, "spawn") and of their storage, run
in a process of their own (``emu.npu.install()`` changes torch for the whole process): prints one JSON
object, check name -> "ok" or the failure's traceback.  Driven by tests/test_npu_processes.py.

The spawned children do not install the drop-in themselves (this module does not, on import): the
first npu tensor they unpickle does, as a child of an unmodified client that never imports torch_npu."""
from __future__ import annotations

import copy
import io
import json
import sys
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp

import emu.npu
from script_checks import raises, registry, run_all

CHECKS: dict[str, Callable[[], None]] = {}
CTX = mp.get_context("spawn")
_POOL: list = []


check = registry(CHECKS)


def pool():
    """Two spawned workers shared by the checks (started once: each child imports torch); results are
    awaited with a timeout, since a worker that cannot unpickle its task leaves the pool waiting."""
    if not _POOL:
        _POOL.append(CTX.Pool(2))
    return _POOL[0]


def describe(t: torch.Tensor) -> dict:
    """What the other side should see of ``t``: type, device, dtype, shape, strides, offset, values."""
    return {"type": type(t).__name__, "device": str(t.device), "dtype": str(t.dtype), "shape": list(t.shape),
            "stride": list(t.stride()), "offset": t.storage_offset(), "values": t.cpu().float().tolist()}


def installed() -> bool:
    """The drop-in is installed in this process (torch_npu is mc2-emu's, torch.npu exists)."""
    return getattr(sys.modules.get("torch_npu"), "__mc2_emu__", False) and hasattr(torch, "npu")


# ----- what the children run (module level: spawn pickles functions by name) -----

def child_of_process(t: torch.Tensor, view: torch.Tensor, results) -> None:
    """Receives npu tensors as Process arguments, reports what it sees, writes into them in place."""
    seen = {"installed": installed(), "t": describe(t), "view": describe(view)}
    t.mul_(10)
    results.put(seen)


def child_of_queue(inbox, outbox, done) -> None:
    """Gets an npu tensor from a queue, adds 1 in place, sends back a new npu tensor made on npu:3, and
    stays alive until the parent has it (the memory it shares is handed over by this process)."""
    t = inbox.get()
    t.add_(1)
    made = torch.arange(4, dtype=torch.float32, device="npu:3") * t.sum().item()
    outbox.put((describe(t), made, installed()))
    done.get()


def double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def describe_all(tensors: list[torch.Tensor]) -> list[dict]:
    return [describe(t) for t in tensors]


def views_of_one_base(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Two views of one npu tensor: do they still share memory here (one storage, one write seen by both)?"""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    same = sa is sb and sa.data_ptr() == sb.data_ptr()
    b.fill_(7)
    return {"same_storage": same, "a": describe(a), "b": describe(b)}


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    """Sends back the tensor it got (the parent compares dtype, device and values)."""
    return t


# ----- the checks (the parent) -----

@check
def process_args_arrive_as_npu_tensors():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).npu(2)
    view = t[1:, ::2]
    results = CTX.Queue()
    p = CTX.Process(target=child_of_process, args=(t, view, results))
    p.start()
    seen = results.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0, p.exitcode
    assert seen["installed"], "unpickling an npu tensor installs the drop-in"
    assert seen["t"] == describe(torch.arange(12, dtype=torch.float32).view(3, 4).npu(2)), seen["t"]
    assert seen["view"]["device"] == "npu:2" and seen["view"]["stride"] == [4, 2] and seen["view"]["offset"] == 4
    assert seen["view"]["values"] == [[4.0, 6.0], [8.0, 10.0]], seen["view"]
    assert torch.equal(t.cpu(), torch.arange(12, dtype=torch.float32).view(3, 4) * 10), "the child's write is seen"
    assert t.device == torch.device("npu", 2) and type(t).__name__ == "NpuTensor"


@check
def queue_round_trip_shares_memory():
    inbox, outbox, done = CTX.Queue(), CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=child_of_queue, args=(inbox, outbox, done))
    p.start()
    t = torch.ones(5, device="npu:1")
    inbox.put(t)
    seen, made, child_installed = outbox.get(timeout=60)
    done.put(True)
    p.join(60)
    assert p.exitcode == 0, p.exitcode
    assert child_installed and seen["device"] == "npu:1" and seen["values"] == [2.0] * 5, seen
    assert torch.equal(t.cpu(), torch.full((5,), 2.0)), "the child's in-place write is seen by the parent"
    assert made.device == torch.device("npu", 3) and type(made) is type(t), made.device
    assert torch.equal(made.cpu(), torch.arange(4, dtype=torch.float32) * 10)


@check
def pool_map_and_apply():
    tensors = [torch.arange(4, dtype=torch.float32).npu(i) + i for i in range(4)]
    doubled = pool().map_async(double, tensors).get(60)
    for i, (t, d) in enumerate(zip(tensors, doubled)):
        assert d.device == torch.device("npu", i) and d.is_npu and torch.equal(d.cpu(), t.cpu() * 2), (i, d)
    one = pool().apply_async(double, (tensors[3],)).get(60)
    assert one.device == torch.device("npu", 3) and torch.equal(one.cpu(), tensors[3].cpu() * 2)


@check
def views_and_strides_are_preserved():
    base = torch.arange(24, dtype=torch.float32).view(4, 6).npu(1)
    sent = [base.t(), base[1:3, 2:], base[:, 1], base[0:1].expand(3, 6), base.view(2, 12)[1]]
    got = pool().apply_async(describe_all, (sent,)).get(60)
    assert got == [describe(t) for t in sent], (got, [describe(t) for t in sent])
    a, b = base[0], base[0, 2:4]
    seen = pool().apply_async(views_of_one_base, (a, b)).get(60)
    assert seen["same_storage"], "two views of one npu tensor share one storage in the child"
    assert seen["b"]["offset"] == 2 and seen["b"]["stride"] == [1], seen["b"]
    assert base.cpu()[0].tolist() == [0, 1, 7, 7, 4, 5], base.cpu()[0]


@check
def dtypes_survive():
    g = torch.Generator().manual_seed(0)
    sent = [torch.randn(3, 5, generator=g).bfloat16().npu(0),
            torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8).npu(2),
            (torch.randn(4, generator=g) > 0).npu(3), torch.randn(2, generator=g).half().npu(),
            torch.arange(3, dtype=torch.int32).npu(1), torch.arange(3).npu(1), torch.zeros(0, 4).npu(2)]
    back = pool().map_async(roundtrip, sent).get(60)
    for s, b in zip(sent, back):
        assert (b.dtype, b.device, b.shape) == (s.dtype, s.device, s.shape) and torch.equal(b.cpu(), s.cpu()), (s, b)


@check
def requires_grad_crosses_and_non_leaves_are_refused():
    leaf = torch.ones(3, device="npu", requires_grad=True)
    back = pool().apply_async(roundtrip, (leaf,)).get(60)
    assert back.requires_grad and back.device.type == "npu"
    param = torch.nn.Parameter(torch.ones(2).npu(1))
    back = pool().apply_async(roundtrip, (param,)).get(60)
    assert isinstance(back, torch.nn.Parameter) and back.device == torch.device("npu", 1)
    raises(RuntimeError, "non-leaf", lambda: ForkingPickler.dumps(leaf * 2))


@check
def file_system_sharing_strategy():
    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        t = torch.arange(6, dtype=torch.float32).npu(2)
        results = CTX.Queue()
        p = CTX.Process(target=child_of_process, args=(t, t[1:], results))
        p.start()
        seen = results.get(timeout=60)
        p.join(60)
        assert p.exitcode == 0 and seen["t"]["device"] == "npu:2", (p.exitcode, seen)
        assert torch.equal(t.cpu(), torch.arange(6, dtype=torch.float32) * 10)
    finally:
        mp.set_sharing_strategy(before)


@check
def storage_resize_releases_memory():
    t = torch.ones(256, 4, device="npu:1")
    view = t[10:20]
    storage = t.untyped_storage()
    assert storage.size() == storage.nbytes() == 4096 and storage.device == torch.device("npu", 1)
    assert storage.resize_(0) is storage
    assert t.inner.untyped_storage().nbytes() == 0 and t.inner.untyped_storage().data_ptr() == 0, "released"
    assert view.untyped_storage().nbytes() == 0 and view.untyped_storage() is storage
    for read in (lambda: t + 1, lambda: view.sum(), lambda: t.cpu(), lambda: repr(view), lambda: t.tolist(),
                 lambda: torch.zeros(256, 4).copy_(t), lambda: t.fill_(1)):
        raises(RuntimeError, "released", read)
    assert t.shape == (256, 4) and t.device == torch.device("npu", 1), "metadata stays"
    storage.resize_(4096)                                       # FSDP's way back: fresh memory, then a copy
    t.copy_(torch.full((256, 4), 3.0))
    assert torch.equal(view.cpu(), torch.full((10, 4), 3.0))


@check
def storage_is_shared_by_views():
    t = torch.arange(8, dtype=torch.float32).npu(2)
    views = (t[2:], t.view(2, 4), t[::2])
    s = t.untyped_storage()
    assert isinstance(s, torch.UntypedStorage) and s.device == torch.device("npu", 2)
    assert s.data_ptr() == t.inner.untyped_storage().data_ptr() and t.data_ptr() == t.inner.data_ptr()
    assert all(v.untyped_storage() is s and v.untyped_storage().data_ptr() == s.data_ptr() for v in views)
    assert views[0].data_ptr() == t.data_ptr() + 8
    other = torch.arange(8, dtype=torch.float32).npu(2)
    assert other.untyped_storage() is not s and other.untyped_storage().data_ptr() != s.data_ptr()
    assert t.storage().size() == 8 and t.storage().device.type == "npu"
    assert s[4:8] is not None and s.tolist() == t.inner.untyped_storage().tolist()
    twin = copy.deepcopy(s)
    assert twin.device == s.device and twin.tolist() == s.tolist() and twin.data_ptr() != s.data_ptr()


@check
def record_stream_and_numpy():
    t = torch.ones(3, device="npu")
    assert t.record_stream(torch.npu.current_stream()) is None
    t.record_stream(torch.npu.Stream())
    raises(TypeError, "cpu()", lambda: t.numpy())


@check
def save_load_and_deepcopy():
    buf = io.BytesIO()
    t = torch.arange(6, dtype=torch.bfloat16).npu(2)
    torch.save({"t": t, "view": t[1:3], "p": torch.nn.Parameter(torch.ones(2).npu(3))}, buf)
    buf.seek(0)
    back = torch.load(buf)                                      # weights_only, torch's default
    assert back["t"].device == torch.device("npu", 2) and back["t"].dtype == torch.bfloat16
    assert torch.equal(back["t"].cpu(), t.cpu()) and torch.equal(back["view"].cpu(), t.cpu()[1:3])
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].device == torch.device("npu", 3)
    model = torch.nn.Linear(4, 2).npu(1)
    twin = copy.deepcopy(model)
    assert twin.weight.device == torch.device("npu", 1) and isinstance(twin.weight, torch.nn.Parameter)
    assert torch.equal(twin.weight.cpu(), model.weight.cpu()) and twin.weight.data_ptr() != model.weight.data_ptr()


@check
def graph_capture_after_storage_use():
    """Storage queries on npu tensors (and views of one base as inputs) leave torch.compile and opcheck working."""
    x = torch.randn(4, 8).npu()
    y = x[1:]
    x.untyped_storage(), y.untyped_storage()
    fn = torch.compile(lambda a, b: (a * 2).sum(0) + b.sum(0), fullgraph=True, backend="aot_eager")
    assert torch.allclose(fn(x, y).cpu(), (x.cpu() * 2).sum(0) + y.cpu().sum(0))
    empty = torch.compile(lambda a: a.sum() + 1, fullgraph=True, backend="aot_eager")
    assert empty(torch.empty(0, device="npu")).item() == 1
    result = torch.library.opcheck(torch.ops.npu.npu_swiglu, (torch.randn(3, 8).npu(),), raise_exception=False)
    assert all(v == "SUCCESS" for v in result.values()), result
    sized = torch.compile(lambda a: a * a.untyped_storage().nbytes(), backend="aot_eager", dynamic=True)
    for n in (3, 5, 7):                                                  # storage calls run eagerly (graph break)
        assert sized(torch.ones(n, device="npu")).cpu().tolist() == [4.0 * n] * n

    def frees(a: torch.Tensor) -> torch.Tensor:
        b = a * 2
        a.untyped_storage().resize_(0)
        return b + 1
    z = torch.ones(3, device="npu")
    assert torch.compile(frees, backend="aot_eager")(z).cpu().tolist() == [3.0] * 3
    assert z.untyped_storage().nbytes() == 0


def main() -> None:
    emu.npu.install()
    try:
        results = run_all(CHECKS)
    finally:
        if _POOL:
            _POOL[0].terminate()
            _POOL[0].join()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
