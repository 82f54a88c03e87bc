"""Row packing: several per-row tensors of mixed dtypes <-> one uint8 matrix (n, B).

One ``all_to_all_single`` then moves payload rows, triples and scales together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Field:
    """One column group of a packed row: ``width`` elements of ``dtype``."""

    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


def row_bytes(fields: list[Field]) -> int:
    return sum(f.nbytes for f in fields)


def pack(parts: list[torch.Tensor], fields: list[Field]) -> torch.Tensor:
    """parts[i]: (n, fields[i].width) of fields[i].dtype -> (n, row_bytes) uint8."""
    n = parts[0].shape[0] if parts else 0
    if n == 0:                                # empty tensors may carry 0 strides: no views
        return torch.empty(0, row_bytes(fields), dtype=torch.uint8)
    cols = [p.reshape(n, f.width).to(f.dtype).contiguous().view(torch.uint8).reshape(n, f.nbytes)
            for p, f in zip(parts, fields)]
    return torch.cat(cols, dim=1)


def unpack(buf: torch.Tensor, fields: list[Field]) -> list[torch.Tensor]:
    """(n, row_bytes) uint8 -> list of (n, width) tensors of each field's dtype."""
    n = buf.shape[0]
    if n == 0:
        return [torch.empty(0, f.width, dtype=f.dtype) for f in fields]
    out, off = [], 0
    for f in fields:
        chunk = buf[:, off:off + f.nbytes].contiguous()
        out.append(chunk.view(f.dtype).reshape(n, f.width))
        off += f.nbytes
    return out


META_BYTES = 4           # one int32 of metadata per row, see pack_meta


def pack_meta(token: np.ndarray, slot: np.ndarray, local: np.ndarray) -> np.ndarray:
    """(token t < 2^16, slot k < 32, local expert < 1024) -> one int32 per row."""
    return ((token.astype(np.int64) << 15) | (slot.astype(np.int64) << 10) | local.astype(np.int64)).astype(np.int32)


def unpack_meta(meta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 words of :func:`pack_meta` -> (token, slot, local expert), int32 each."""
    return meta >> 15, (meta >> 10) & 31, meta & 1023


def rows_for_meta(n: np.ndarray | int, width: int):
    """Rows of ``width`` bytes that hold the int32 metadata of ``n`` payload rows."""
    return -(-META_BYTES * n // max(width, 1))


class Segments:
    """A packed all-to-all buffer of uniform rows of ``width`` bytes, one segment per peer
    (in group-rank order): the peer's ``n`` payload rows, then ``ceil(4n / width)`` rows that
    carry its ``n`` int32 metadata words.  Payload rows can then be gathered straight from or
    into the buffer, with no per-row interleaving of metadata.

    counts: (P,) payload rows per peer (group order); width: payload bytes per row; start /
    total: where each peer's segment starts and the buffer's rows (default: segments back to
    back), e.g. one segment per fixed-size slot after its header; meta: the int32 metadata of
    every payload row (peers in order) when it travels apart from the rows (bare rows, see
    ``Call.exchange``): the segments then have no tails.
    """

    def __init__(self, counts: np.ndarray, width: int, start: np.ndarray | None = None, total: int | None = None,
                 meta: np.ndarray | None = None):
        self.n = np.asarray(counts, dtype=np.int64)
        self.width = width
        self.meta = meta
        self.meta_rows = rows_for_meta(self.n, width) if meta is None else np.zeros_like(self.n)
        self.rows = self.n + self.meta_rows
        self.start = (np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64) if start is None
                      else np.asarray(start, dtype=np.int64))
        self.total = int(self.rows.sum()) if total is None else total
        self._parts: tuple[np.ndarray, np.ndarray] | None = None

    def _payload_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(peer, place within the peer's payload) of every payload row, peers in order (made once)."""
        if self._parts is None:
            seg = np.repeat(np.arange(self.n.size), self.n)
            self._parts = seg, np.arange(seg.size) - (np.cumsum(self.n) - self.n)[seg]
        return self._parts

    def payload_index(self) -> np.ndarray:
        """Buffer row of every payload row, peers in order, each peer's rows in order."""
        seg, within = self._payload_rows()
        return self.start[seg] + within

    def row_map(self, source_rows: np.ndarray) -> np.ndarray | None:
        """For a gather that fills the whole buffer in one op: the source row of every buffer
        row (``source_rows[i]`` for payload row i, peers in order; 0 for header, metadata and
        unused rows, which are written afterwards or never read).  None when the buffer has
        many more rows than payload (then a gather per segment moves less)."""
        n = int(self.n.sum())
        if not n or self.total - n > n // 4 + 2 * self.n.size:
            return None
        out = np.zeros(self.total, np.int64)
        out[self.payload_index()] = source_rows
        return out

    def gather(self, src: tuple[torch.Tensor, ...], index: np.ndarray, dst: tuple[torch.Tensor, ...]) -> None:
        """dst[j][payload row i] = src[j][index[i]] for every j, straight into each peer's segment
        (``dst[j]``: views of the buffer with a row per buffer row): one gather over the whole
        buffer when it holds little else (:meth:`row_map`), else one per segment."""
        whole = self.row_map(index)
        if whole is not None:
            whole_t = torch.from_numpy(whole)
            for s, d in zip(src, dst):
                torch.index_select(s, 0, whole_t, out=d)
            return
        index_t, done = torch.from_numpy(np.ascontiguousarray(index, np.int64)), 0
        for p in np.flatnonzero(self.n):
            a, n = int(self.start[p]), int(self.n[p])
            for s, d in zip(src, dst):
                torch.index_select(s, 0, index_t[done:done + n], out=d[a:a + n])
            done += n

    def _meta_offsets(self) -> np.ndarray:
        """Flat byte offset of every metadata word, payload rows in peer order."""
        seg, within = self._payload_rows()
        return (self.start + self.n)[seg] * self.width + META_BYTES * within

    def _meta_words(self) -> np.ndarray:
        """Flat offset of every metadata word in units of 4 bytes (``width`` a multiple of 4)."""
        return self._meta_offsets() // META_BYTES

    def _meta_bytes(self) -> np.ndarray:
        """Flat byte offset of every metadata byte, payload rows in peer order (4 per row)."""
        return (self._meta_offsets()[:, None] + np.arange(META_BYTES)).reshape(-1)

    def _words(self, buf: torch.Tensor) -> torch.Tensor | None:
        """``buf`` as int32 words when every metadata word is aligned to one (else None)."""
        if self.width % META_BYTES or buf.storage_offset() % META_BYTES or buf.numel() % META_BYTES:
            return None
        return buf.reshape(-1).view(torch.int32)

    def write_meta(self, buf: torch.Tensor, meta: np.ndarray) -> None:
        """Store ``meta`` (int32, payload rows in peer order) into each segment's tail rows."""
        if not self.n.sum():
            return
        words = self._words(buf)
        if words is not None:
            words[torch.from_numpy(self._meta_words())] = torch.from_numpy(np.ascontiguousarray(meta, np.int32))
            return
        buf.view(-1)[torch.from_numpy(self._meta_bytes())] = \
            torch.from_numpy(np.ascontiguousarray(meta, np.int32)).view(torch.uint8)

    def read_meta(self, buf: torch.Tensor) -> np.ndarray:
        """The int32 metadata of every payload row, peers in order."""
        if self.meta is not None:
            return self.meta
        if not self.n.sum():
            return np.zeros(0, np.int32)
        words = self._words(buf)
        if words is not None:
            return words.numpy()[self._meta_words()]
        return buf.reshape(-1).numpy()[self._meta_bytes()].view(np.int32)
