"""ring_attention: each rank's queries against every rank's keys, K/V passed around a ring.

A rank holds its slices of q, k and v (sharding.py). At each of the world steps it computes the
blocks the schedule gives (schedule.py) against the K/V in hand with flash_attention, merges
them into its running (O, L) with merge_attention (exact: attention over disjoint key sets), and
sends the K/V to rank + 1 while receiving rank - 1's.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from ..api import flash_attention
from ..merge import merge_attention
from .._typing import Array
from .schedule import ring_schedule
from .sharding import array_module, chunks_per_rank


class Group(Protocol):
    """What ring_attention needs of a communicator."""
    rank: int
    world_size: int

    def exchange(self, arrays: tuple) -> tuple:
        """Send arrays to rank + 1 and return the arrays of the same shapes from rank - 1
        (mod world_size); every rank calls it together, as NCCL send/recv pairs."""
        ...


class _SingleRank:
    rank, world_size = 0, 1

    def exchange(self, arrays: tuple) -> tuple:
        return arrays


def ring_attention(q: Array, k: Array, v: Array, *, causal: bool = False, softmax_scale: float | None = None,
                   return_lse: bool = False, group: Group | None = None, layout: str = "contiguous") -> Any:
    """This rank's slice of attention over the whole sequence, from this rank's slices.

    q: (..., n_q, d), k, v: (..., n_k, d): this rank's slices (shard(x, world, rank, layout=...)),
        NumPy or CuPy; every rank's of one shape. k and v may have fewer heads (GQA), as in
        flash_attention.
    causal: the causal mask of the whole sequence (total Nq == Nk, so n_q == n_k): a query sees
        the keys at and before its own position.
    softmax_scale: defaults to 1 / sqrt(d), as for the whole problem in one call.
    return_lse: also return this rank's slice of L (float32, (..., n_q)).
    group: the communicator (Group: rank, world_size, exchange); None runs one rank alone.
    layout: how the sequence was sharded, "contiguous" or "zigzag" (balances causal work).

    Returns this rank's slice of O (q's dtype and array kind), and of L when return_lse. The
    result is the attention of the full sequence up to the rounding of world merges.
    """
    group = _SingleRank() if group is None else group
    world, rank = group.world_size, group.rank
    _check_slices(q, k, v, causal=causal, layout=layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    xp = array_module(q)
    acc = np.result_type(q.dtype, np.float32)       # merge in fp32 (fp64 for fp64), round once
    O = xp.zeros(q.shape, acc)
    L = xp.full(q.shape[:-1], -np.inf, np.float32)  # no key yet: merging a part in is exact
    steps = ring_schedule(world, rank, q.shape[-2], k.shape[-2], causal=causal, layout=layout)
    for t, blocks in enumerate(steps):
        for b in blocks:
            O_b, L_b = flash_attention(q[..., b.q, :], k[..., b.k, :], v[..., b.k, :], causal=b.causal,
                                       softmax_scale=scale, return_lse=True)
            O[..., b.q, :], L[..., b.q] = merge_attention(O[..., b.q, :], L[..., b.q], O_b.astype(acc), L_b)
        if t + 1 < world:
            k_next, v_next = group.exchange((k, v))
            if k_next.shape != k.shape or v_next.shape != v.shape:
                raise ValueError(f"ring_attention: rank {rank} holds k, v of shapes {tuple(k.shape)}, "
                                 f"{tuple(v.shape)} but received {tuple(k_next.shape)}, {tuple(v_next.shape)} "
                                 "from its neighbour; every rank must hold slices of one shape (shard "
                                 "the sequence with flashattn_cupy.distributed.shard)")
            k, v = k_next, v_next
    O = O.astype(q.dtype, copy=False)
    return (O, L) if return_lse else O


def _check_slices(q, k, v, *, causal: bool, layout: str) -> None:
    per = chunks_per_rank(layout)
    if q.ndim < 2 or k.ndim < 2:
        raise ValueError(f"ring_attention takes q (..., n_q, d) and k, v (..., n_k, d); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    n_q, n_k = q.shape[-2], k.shape[-2]
    if causal and n_q != n_k:
        raise ValueError(f"causal ring_attention needs query and key slices of one length (the whole "
                         f"sequence's Nq == Nk); got n_q={n_q}, n_k={n_k}")
    if n_q % per or n_k % per:
        raise ValueError(f"layout 'zigzag' slices hold two equal chunks, so an even length; got n_q={n_q}, "
                         f"n_k={n_k} (shard with flashattn_cupy.distributed.shard)")
