"""The header every group of a call starts with, as a typed value and its wire codec.

A header is one fixed ``(P, HEADER_LEN)`` int64 block per exchange: from each source to
each destination the call number and op, an error code, the row count and row size the
destination must expect (gloo corrupts data silently if the two sides disagree), the rows
it expects back (combine's cross-check), the source's clock when it sent the header, and the
attributes every rank must agree on.  Only this module knows the column layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAGIC = 0x4D43325F454D55          # "MC2_EMU"
OPS = {1: "dispatch", 2: "combine"}
OP_CODE = {v: k for k, v in OPS.items()}
_MAGIC, _OP, _ORDER, _ERR, _ROWS, _ROW_BYTES, _CLOCK, _EXPECT, _ORIGIN, _NATTR, _CALL = range(11)
_ATTRS = 11
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

    def encode(self) -> torch.Tensor:
        """The (P, HEADER_LEN) int64 block, row i for logical destination i."""
        h = torch.zeros(len(self.rows), HEADER_LEN, dtype=torch.int64)
        h[:, _MAGIC] = MAGIC
        h[:, _OP] = OP_CODE[self.op]
        h[:, _ORDER] = self.order
        h[:, _CALL] = self.call_no
        h[:, _ERR] = self.error
        h[:, _ROWS] = torch.from_numpy(np.asarray(self.rows, dtype=np.int64))
        h[:, _ROW_BYTES] = self.row_bytes
        h[:, _CLOCK] = self.clock_ns
        h[:, _EXPECT] = torch.from_numpy(np.asarray(self.expect, dtype=np.int64))
        h[:, _ORIGIN] = self.origin
        h[:, _NATTR] = len(self.attrs)
        if self.attrs:
            h[:, _ATTRS:_ATTRS + len(self.attrs)] = torch.tensor(self.attrs)
        return h


def stamp_clock(block: torch.Tensor, clock_ns: int) -> None:
    """Write the send time into an encoded block, just before it leaves (so that a source that
    is slow between opening the call and sending counts as late)."""
    block[:, _CLOCK] = clock_ns


@dataclass(frozen=True)
class Header:
    """What every source of one domain told this rank; (P,) int64 arrays in logical order.

    genuine: the block carries the emulator's magic (False: a collective outside the op);
    op / order: the source's op and the place of its call among its op calls on the group (what
    every rank must agree on); call_no: the call's number among its op's calls (for messages);
    error / origin: its error code and the rank it blames;
    rows / row_bytes: what it sends this rank; expect: the rows it expects back; clock: its
    CLOCK_MONOTONIC entry time (ns); attrs (P, MAX_ATTRS): its agreed attributes.
    """

    genuine: np.ndarray
    op: np.ndarray
    order: np.ndarray
    call_no: np.ndarray
    error: np.ndarray
    rows: np.ndarray
    row_bytes: np.ndarray
    clock: np.ndarray
    expect: np.ndarray
    origin: np.ndarray
    attrs: np.ndarray

    @classmethod
    def decode(cls, block: np.ndarray) -> "Header":
        """From the (P, HEADER_LEN) int64 block received, rows in logical order."""
        return cls(genuine=block[:, _MAGIC] == MAGIC, op=block[:, _OP], order=block[:, _ORDER], call_no=block[:, _CALL],
                   error=block[:, _ERR], rows=block[:, _ROWS], row_bytes=block[:, _ROW_BYTES],
                   clock=block[:, _CLOCK], expect=block[:, _EXPECT], origin=block[:, _ORIGIN],
                   attrs=block[:, _ATTRS:])

    def op_name(self, i: int) -> str:
        return OPS.get(int(self.op[i]), "?")
