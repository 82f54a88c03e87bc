"""Ranks in words: "rank 3", "ranks 0-2, 4-7"."""
from __future__ import annotations


def spans(ranks: list[int]) -> str:
    """[0, 1, 2, 4, 5] -> "0-2, 4-5" (ranks ascending)."""
    out, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def who(ranks: list[int]) -> str:
    """"rank 3" or "ranks 0-2, 4" (any order)."""
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {spans(ranks)}"
