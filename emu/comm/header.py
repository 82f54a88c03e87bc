"""The header every group of a call starts with, as a typed value and its wire codec.

A header is one fixed ``(P, HEADER_LEN)`` int64 block per exchange: from each source to
each destination the call number and op, an error code, the row count and row size the
destination must expect (gloo corrupts data silently if the two sides disagree), the rows
it expects back (combine's cross-check), the source's clock when it sent the header, whether
its rows follow in the same exchange (inline) or in a second one (packed, or bare with their
metadata in this exchange), and the attributes every
rank must agree on.  Only this module knows the column layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAGIC = 0x4D43325F454D55          # "MC2_EMU"
OPS = {1: "dispatch", 2: "combine"}
OP_CODE = {v: k for k, v in OPS.items()}
(_MAGIC, _OP, _ORDER, _ERR, _ROWS, _ROW_BYTES, _CLOCK, _EXPECT, _ORIGIN, _NATTR, _CALL, _INLINE, _LATER,
 _KIND) = range(14)
_ATTRS = 14
HEADER_LEN = 40
MAX_ATTRS = HEADER_LEN - _ATTRS


@dataclass(frozen=True)
class Outgoing:
    """What this rank tells every peer of one domain in a header exchange.

    rows, expect: (P,) int64 per logical destination; the rest is the same for every peer.
    """

    op: str
    order: int
    call_no: int
    error: int
    rows: np.ndarray
    row_bytes: int
    clock_ns: int
    expect: np.ndarray
    origin: int
    attrs: tuple[int, ...]
    inline: bool = False            # its rows travel in this exchange, after the header
    later: bool = False             # it sends rows in a second exchange (to some destination)
    bare: bool = False              # ... as bare rows, their metadata after the header in this exchange
    kind: int = 0                   # with an error: the relayed verdict's kind (0: an input was rejected)

    def encode_into(self, block: np.ndarray, order: np.ndarray | None = None) -> None:
        """Write the (P, HEADER_LEN) int64 block in place (any row stride): row i for logical
        destination i, or with ``order`` for logical destination ``order[i]`` (group order)."""
        block[:, :_ATTRS] = (MAGIC, OP_CODE[self.op], self.order, self.error, 0, self.row_bytes, self.clock_ns, 0,
                             self.origin, len(self.attrs), self.call_no, int(self.inline), int(self.later) * (1 + int(self.bare)), self.kind)
        block[:, _ATTRS:] = 0
        block[:, _ROWS] = self.rows if order is None else self.rows[order]
        block[:, _EXPECT] = self.expect if order is None else self.expect[order]
        if self.attrs:
            block[:, _ATTRS:_ATTRS + len(self.attrs)] = self.attrs

    def encode(self) -> torch.Tensor:
        """The (P, HEADER_LEN) int64 block, row i for logical destination i."""
        h = np.empty((len(self.rows), HEADER_LEN), dtype=np.int64)
        self.encode_into(h)
        return torch.from_numpy(h)


#: The columns every source of a healthy call sends alike: magic, op, the call's place, no error
#: (nor relayed kind), the number of attributes and the attributes themselves.
SAME_COLUMNS = np.array([_MAGIC, _OP, _ORDER, _ERR, _NATTR, _KIND] + list(range(_ATTRS, HEADER_LEN)))


_SAME_MASK = np.zeros(HEADER_LEN, dtype=np.int64)
_SAME_MASK[SAME_COLUMNS] = -1                     # all bits of the shared columns, none of the others


def all_alike(received: np.ndarray, sent_row: np.ndarray) -> bool:
    """Every source sent what this rank sent in :data:`SAME_COLUMNS` (``sent_row``: one row of
    this rank's own block, sent without error): the common case, in which no verdict is due."""
    return not ((received ^ sent_row) & _SAME_MASK).any()


def stamp_clock(block: np.ndarray, clock_ns: int) -> None:
    """Write the send time into an encoded block (numpy view, any row stride), just before it
    leaves (so that a source that is slow between opening the call and sending counts as late)."""
    block[:, _CLOCK] = clock_ns


def clock_of(block: np.ndarray) -> np.ndarray:
    """The send clocks of a received block (rows in the block's order)."""
    return block[:, _CLOCK]


class Header:
    """What every source of one domain told this rank; (P,) int64 arrays in logical order, read
    from the received block when asked for (most calls read three of them).

    genuine: the block carries the emulator's magic (False: a collective outside the op);
    op / order: the source's op and the place of its call among its op calls on the group (what
    every rank must agree on); call_no: the call's number among its op's calls (for messages);
    error / origin / kind: its error code, the rank it blames and what it relays (0: a rejected
    input; else the index of a relayed verdict's kind in ``verdict.RELAYED``, whose culprits the
    relaying rank left in the store);
    rows / row_bytes: what it sends this rank; expect: the rows it expects back; clock: its
    CLOCK_MONOTONIC send time (ns); inline: its rows to this rank follow its header in the same
    exchange; later: it sends rows in a second exchange; bare: it sends them bare (their metadata
    followed its header); attrs (P, MAX_ATTRS): its agreed
    attributes.
    """

    __slots__ = ("block",)

    def __init__(self, block: np.ndarray):
        self.block = block

    @classmethod
    def decode(cls, block: np.ndarray) -> "Header":
        """From the (P, HEADER_LEN) int64 block received, rows in logical order (kept, not copied)."""
        return cls(block)

    genuine = property(lambda self: self.block[:, _MAGIC] == MAGIC)
    op = property(lambda self: self.block[:, _OP])
    order = property(lambda self: self.block[:, _ORDER])
    call_no = property(lambda self: self.block[:, _CALL])
    error = property(lambda self: self.block[:, _ERR])
    rows = property(lambda self: self.block[:, _ROWS])
    row_bytes = property(lambda self: self.block[:, _ROW_BYTES])
    clock = property(lambda self: self.block[:, _CLOCK])
    expect = property(lambda self: self.block[:, _EXPECT])
    origin = property(lambda self: self.block[:, _ORIGIN])
    attrs = property(lambda self: self.block[:, _ATTRS:])
    inline = property(lambda self: self.block[:, _INLINE] != 0)
    later = property(lambda self: self.block[:, _LATER] != 0)
    bare = property(lambda self: self.block[:, _LATER] == 2)

    @property
    def any_bare(self) -> bool:
        """Some source sends its rows bare."""
        return bool((self.block[:, _LATER] == 2).any())
    kind = property(lambda self: self.block[:, _KIND])

    def op_name(self, i: int) -> str:
        return OPS.get(int(self.op[i]), "?")
