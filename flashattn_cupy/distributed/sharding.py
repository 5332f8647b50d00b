"""shard / unshard: a full sequence into the slices the ranks of a ring hold, and back.

"contiguous": rank r holds chunk r of `world` equal chunks. Under causal attention rank r's
queries see r + 1/2 chunks' worth of keys, so the last rank works 2 world - 1 times as long as
the first, and the ring, which steps in lockstep, waits on it.
"zigzag": the sequence is cut into 2 world chunks and rank r holds chunks r and 2 world - 1 - r
(one early, one late), so every rank does the same causal work at every step (Brandon et al.,
"Striped attention", 2023, and the zigzag layout of ring-flash-attention / Megatron's context
parallelism). Without a causal mask the layout changes nothing but the order of rows.
"""
from __future__ import annotations

import numpy as np

from .. import _device
from .._typing import Array

LAYOUTS = ("contiguous", "zigzag")


def array_module(x):
    return np if isinstance(x, np.ndarray) else _device.cupy()


def chunks_per_rank(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def chunk_ids(world: int, rank: int, layout: str) -> tuple[int, ...]:
    """Which chunks of the sequence rank holds, in the order it holds them."""
    return (rank, 2 * world - 1 - rank) if chunks_per_rank(layout) == 2 else (rank,)


def shard(x: Array, world: int, rank: int, *, layout: str = "contiguous", axis: int = -2) -> Array:
    """Rank `rank`'s slice of x (NumPy or CuPy) along axis (the sequence dim: -2 for q, k, v and
    O of shape (..., N, d); -1 for L of shape (..., N)), for a ring of `world` ranks.

    N must divide into world equal chunks ("contiguous") or 2 world ("zigzag"); otherwise a
    ValueError. A contiguous slice is a view; a zigzag slice is a new array.
    """
    _check_rank(world, rank)
    n_chunks = world * chunks_per_rank(layout)
    N = x.shape[axis]
    if N % n_chunks:
        raise ValueError(f"shard: a sequence of length {N} does not cut into {n_chunks} equal chunks "
                         f"({world} ranks, layout {layout!r}); pad it to a multiple of {n_chunks} (for "
                         "causal attention, padding the end of q, k and v and dropping the padded rows "
                         "of O is exact)")
    c = N // n_chunks
    pieces = [_take(x, slice(i * c, (i + 1) * c), axis) for i in chunk_ids(world, rank, layout)]
    return pieces[0] if len(pieces) == 1 else array_module(x).concatenate(pieces, axis=axis)


def unshard(parts: list, *, layout: str = "contiguous", axis: int = -2) -> Array:
    """The full sequence from every rank's slice, parts[r] from rank r: the inverse of shard."""
    if chunks_per_rank(layout) == 1:
        return array_module(parts[0]).concatenate(list(parts), axis=axis)
    lengths = {p.shape[axis] for p in parts}
    if len(lengths) != 1 or lengths.pop() % 2:
        raise ValueError(f"unshard: zigzag slices hold two equal chunks each, so one even length; got "
                         f"lengths {[p.shape[axis] for p in parts]} along axis {axis}")
    c = parts[0].shape[axis] // 2
    early = [_take(p, slice(0, c), axis) for p in parts]               # chunks 0 .. world - 1
    late = [_take(p, slice(c, 2 * c), axis) for p in reversed(parts)]  # chunks world .. 2 world - 1
    return array_module(parts[0]).concatenate(early + late, axis=axis)


def _take(x, s: slice, axis: int):
    index = [slice(None)] * x.ndim
    index[axis] = s
    return x[tuple(index)]


def _check_rank(world: int, rank: int) -> None:
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need world >= 1 and 0 <= rank < world, got world={world!r}, rank={rank!r}")
