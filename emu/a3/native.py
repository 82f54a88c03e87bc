"""The optional native accelerator of the A3 data path (``native.c`` beside this file).

Five loops of the phases (two of them in two forms), each otherwise many numpy/torch
operations per call:

    pack_rows        rows gathered into their peers' wire segments, with the metadata tails
                     (dispatch and combine ``pack_rows``)
    dispatch_layout  dispatch's receive layout: expand_x (and dynamic_scales), the assist
                     triples and ep_recv_counts (``lay_out``)
    dynamic_quant    dispatch's dynamic int8 quantisation in one pass per row (``dynamic_quant``)
    combine_sum      combine's fp32 k-order weighted sum of the received rows (``combine_rows``)
    combine_out      for bf16: that sum (+ shared_expert_x) rounded straight into x_out, a token
                     at a time (``combine_rows`` and ``combine_output``)
    tp_add           combine's TP reduce of bf16 rows in one pass (``tp_add``), or fused with
                     the packing of the reduced rows (``pack_tp_add``)

The C source is compiled on first use with the system C compiler (``cc``, or ``$CC``) into a
cache folder (``EMU_NATIVE_DIR``, default ``~/.cache/mc2-emu/native``), one library per source
hash, and loaded with ctypes.  With no compiler, a failed build or ``EMU_NATIVE=0`` every
phase runs its Python code: the results are the same bytes either way (tests/test_native.py
runs both).  Each function returns False (having written nothing, or only into a buffer the
caller then fills again) for a case it does not take, and the caller then runs the Python
code, which also raises whatever error the case calls for.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..comm.wire import Segments
from ..core.env import getenv

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "mc2_pack_rows": ([_P, _I, _P, _P, _I, _P, _I, _P, _P, _P, _P, _P], ctypes.c_int),
    "mc2_dispatch_layout": ([_P, _I, _P, _P, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P], ctypes.c_int64),
    "mc2_dynamic_quant": ([_P, _I, ctypes.c_int, _P, _P, _P, _I, _P, _P], ctypes.c_int),
    "mc2_combine_sum": ([_P, _I, _P, _P, _P, _I, ctypes.c_int, _I, _I, _I, _I, _P, _P], ctypes.c_int),
    "mc2_combine_out_bf16": ([_P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P], ctypes.c_int),
    "mc2_tp_add_bf16": ([_P, _I, _P, _I, _I, _I, _P], ctypes.c_int),
    "mc2_pack_tp_add_bf16": ([_P, _I, _P, _P, _I, _P, _I, _P, _I, _I, _P, _P, _P, _P], ctypes.c_int),
}


class _Library:
    """The built library, loaded once per process (None when it cannot be had), and why not."""

    lib: ctypes.CDLL | None = None
    tried = False
    reason = "not built yet"


def _cache_dir() -> Path:
    return Path(os.environ.get("EMU_NATIVE_DIR") or Path.home() / ".cache" / "mc2-emu" / "native")


def _build() -> ctypes.CDLL:
    """Compile (once per source and compiler flags, shared by every process) and load."""
    text = SOURCE.read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc, gcc or $CC)")
    digest = hashlib.sha256(text + " ".join(FLAGS).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"mc2_native_{digest}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)                       # atomic: ranks that build at once all succeed
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded accelerator, or None (``EMU_NATIVE=0``, no compiler, a failed build)."""
    if getenv("EMU_NATIVE", "1").strip() == "0":
        return None
    if not _Library.tried:
        _Library.tried = True
        try:
            _Library.lib, _Library.reason = _build(), "built"
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            _Library.reason = f"{type(e).__name__}: {e} {detail.decode(errors='replace')[:400]}".strip()
    return _Library.lib


def status() -> str:
    """'on', or 'off: <why>' (for the bench and the troubleshooting guide)."""
    if getenv("EMU_NATIVE", "1").strip() == "0":
        return "off: EMU_NATIVE=0"
    return "on" if library() is not None else f"off: {_Library.reason}"


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def pack_rows(buf: torch.Tensor, width: int, start: np.ndarray, n: np.ndarray, src: torch.Tensor,
              index: np.ndarray, extra: torch.Tensor | None, meta: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
    """Payload row i of the (rows, ``width``) uint8 ``buf`` (peer p's rows from ``start[p]``,
    ``n[p]`` of them, peers in order) <- ``src[index[i]]``, then ``extra[index[i]]`` (4 bytes);
    metadata word i <- ``meta`` (token, slot, local).  False: not taken."""
    lib = library()
    if lib is None or not (buf.is_contiguous() and src.is_contiguous()) or src.dim() != 2 \
            or (extra is not None and not (extra.is_contiguous() and extra.element_size() == 4)):
        return False
    start, n = _i64(start), _i64(n)
    index, token, slot, local = (_i64(a) for a in (index, *meta))
    row_bytes = src.shape[1] * src.element_size()
    return lib.mc2_pack_rows(buf.data_ptr(), width, _ptr(start), _ptr(n), n.size, src.data_ptr(), row_bytes,
                             _ptr(index), None if extra is None else extra.data_ptr(),
                             _ptr(token), _ptr(slot), _ptr(local)) == 0


def _meta(received: Segments) -> np.ndarray | None:
    """The metadata words carried apart from the rows (bare rows), as contiguous int32, or None."""
    return None if received.meta is None else np.ascontiguousarray(received.meta, dtype=np.int32)


def dispatch_layout(buf: torch.Tensor, received: Segments, logical: np.ndarray, sizes: tuple[int, int, int, int],
                    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]) -> int | None:
    """Lay the received rows out (``lay_out``; ``received``: their segments in ``buf``):
    ``sizes`` = (W, blocks, payload bytes, capacity rows); ``out`` = (expand_x, dynamic_scales
    or None, assist_info, ep_recv_counts), all contiguous.  Returns the rows laid out, or None:
    not taken (nothing written)."""
    lib = library()
    x, scales, assist, ep_recv = out
    if lib is None or not (buf.is_contiguous() and x.is_contiguous()):
        return None
    start, n, logical, meta = _i64(received.start), _i64(received.n), _i64(logical), _meta(received)
    got = lib.mc2_dispatch_layout(buf.data_ptr(), received.width, _ptr(start), _ptr(n),
                                  None if meta is None else _ptr(meta), n.size, _ptr(logical), *sizes,
                                  x.data_ptr(), None if scales is None else scales.data_ptr(),
                                  assist.data_ptr(), ep_recv.data_ptr())
    return None if got < 0 else int(got)


def combine_sum(buf: torch.Tensor, received: Segments, dtype: torch.dtype, weights: torch.Tensor, slots: int,
                acc: torch.Tensor) -> bool:
    """acc (Bs, H) fp32 += the k-order weighted sum of the received rows (``received``: their
    segments in ``buf``; ``combine_rows`` without copy or const experts); ``weights`` (Bs, K)
    fp32 contiguous.  False: not taken."""
    lib = library()
    if lib is None or dtype not in (torch.bfloat16, torch.float16) or not buf.is_contiguous():
        return False
    bs, h = acc.shape
    start, n, meta = _i64(received.start), _i64(received.n), _meta(received)
    return lib.mc2_combine_sum(buf.data_ptr(), received.width, _ptr(start), _ptr(n),
                               None if meta is None else _ptr(meta), n.size, int(dtype == torch.float16),
                               h, bs, weights.shape[1], slots, weights.data_ptr(), acc.data_ptr()) == 0


def combine_out(buf: torch.Tensor, received: Segments, weights: torch.Tensor, slots: int,
                shared: torch.Tensor | None, active: np.ndarray | None, out: torch.Tensor) -> bool:
    """out (Bs, H) bf16 = bf16(the k-order weighted sum of the received bf16 rows (``received``:
    their segments in ``buf``), + fp32(shared) when given), rows of tokens not ``active`` (Bs,)
    bool zero: ``combine_rows`` then ``combine_output``; ``weights`` (Bs, K) fp32 contiguous,
    ``shared`` (Bs, H) bf16 contiguous.  False: not taken (a row out of range, or a NaN to
    round; ``out`` may be partly written)."""
    lib = library()
    if lib is None or not buf.is_contiguous() or out.dtype != torch.bfloat16 or not out.is_contiguous():
        return False
    bs, h = out.shape
    width, start, n, meta = received.width, _i64(received.start), _i64(received.n), _meta(received)
    mask = None if active is None else np.ascontiguousarray(active, dtype=np.bool_)
    return lib.mc2_combine_out_bf16(buf.data_ptr(), width, _ptr(start), _ptr(n), None if meta is None else _ptr(meta),
                                    n.size, h, bs, weights.shape[1],
                                    slots, weights.data_ptr(), None if shared is None else shared.data_ptr(),
                                    None if mask is None else _ptr(mask), out.data_ptr()) == 0


def dynamic_quant(x: torch.Tensor, token: np.ndarray, smooth: torch.Tensor | None,
                  smooth_row: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``numerics.dynamic_quant(x[token], smooth[smooth_row])``: (n, H) int8 and (n,) fp32, or
    None: not taken (no library, a layout it does not take, or a value that is not finite)."""
    lib = library()
    if lib is None or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 2 or not x.is_contiguous() \
            or (smooth is not None and not (smooth.dtype == torch.float32 and smooth.is_contiguous()
                                            and smooth.dim() == 2 and smooth.shape[1] == x.shape[1])):
        return None
    token = _i64(token)
    srow = _i64(smooth_row) if smooth is not None else token
    q = torch.empty(token.size, x.shape[1], dtype=torch.int8)
    scale = torch.empty(token.size, dtype=torch.float32)
    got = lib.mc2_dynamic_quant(x.data_ptr(), x.shape[1], int(x.dtype == torch.float16), _ptr(token),
                                None if smooth is None else smooth.data_ptr(), _ptr(srow), token.size,
                                q.data_ptr(), scale.data_ptr())
    return (q, scale) if got == 0 else None


def tp_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    """(n, H) bf16 rows, each row contiguous: what the TP reduce takes."""
    return a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and a.shape == b.shape and a.dim() == 2 \
        and (a.shape[1] <= 1 or (a.stride(1) == 1 and b.stride(1) == 1))


def tp_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``numerics.tp_add(a, b)`` for (n, H) bf16 rows (each row contiguous): (n, H) bf16, or
    None: not taken (no library, another dtype or layout, or a sum that is a NaN)."""
    lib = library()
    if lib is None or not tp_pair(a, b):
        return None
    out = torch.empty(a.shape, dtype=torch.bfloat16)
    got = lib.mc2_tp_add_bf16(a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), a.shape[0], a.shape[1],
                              out.data_ptr())
    return out if got == 0 else None


def pack_tp_add(buf: torch.Tensor, sent: Segments, pair: tuple[torch.Tensor, torch.Tensor], index: np.ndarray,
                meta: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
    """``pack_rows`` of ``tp_add(*pair)`` without storing the sum: payload row i of ``buf`` <-
    bf16(fp32(a[index[i]]) + fp32(b[index[i]])) for the (n, H) bf16 rows ``pair`` (each row
    contiguous), metadata word i <- ``meta``.  False: not taken (no library, another dtype or
    layout, or a NaN sum; ``buf`` may then be partly written)."""
    lib = library()
    a, b = pair
    if lib is None or not tp_pair(a, b) or not buf.is_contiguous():
        return False
    start, n = _i64(sent.start), _i64(sent.n)
    index, token, slot, local = (_i64(x) for x in (index, *meta))
    return lib.mc2_pack_tp_add_bf16(buf.data_ptr(), sent.width, _ptr(start), _ptr(n), n.size, a.data_ptr(),
                                    a.stride(0), b.data_ptr(), b.stride(0), a.shape[1], _ptr(index), _ptr(token),
                                    _ptr(slot), _ptr(local)) == 0
