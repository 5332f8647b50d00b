"""ring_attention: each rank's queries against every rank's keys, K/V passed around a ring.

A rank holds its slices of q, k and v (sharding.py). At each of the world steps it computes the
blocks the schedule gives (schedule.py) against the K/V in hand with flash_attention, merges
them into its running (O, L) with merge_attention (exact: attention over disjoint key sets), and
sends the K/V to rank + 1 while receiving rank - 1's.

With a communicator that can start a transfer and wait for it later (start/wait), the K/V of
step t + 1 travel while step t computes: double buffering. The K/V in hand are read by the
kernels and sent on; the next arrive in the other of two receive buffers, never the one being
read, and step t + 1 waits for them only once step t's kernels are queued.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Protocol

import numpy as np

from ..api import flash_attention
from ..merge import merge_attention
from .._typing import Array
from .schedule import ring_schedule
from .sharding import array_module, chunks_per_rank


class Group(Protocol):
    """What ring_attention needs of a communicator. It may also offer

        start(send: tuple, recv: tuple) -> handle: begin sending the arrays `send` to rank + 1 and
            receiving rank - 1's into `recv` (arrays of the same shapes and dtypes, contiguous);
            until wait(handle) the caller neither writes `send` nor touches `recv`;
        wait(handle) -> None: after it, `recv` holds rank - 1's arrays (for the work queued next,
            on a GPU);
        agree(value: int) -> bool: whether every rank passed the same value (called by all);

    ring_attention then overlaps each exchange with a step's compute (start/wait) and refuses
    ranks called with different shapes on all of them at once (agree) rather than leaving some
    waiting for a transfer that never comes. NcclGroup and LocalRing offer all three."""
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
    group: the communicator (Group: rank, world_size, exchange, and start/wait/agree where it has
        them): NcclGroup over NCCL on GPUs, a LocalRing's rank on the CPU; None runs one rank alone.
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
    if world > 1 and hasattr(group, "agree") and not group.agree(_signature(q, k, v, causal, layout)):
        raise ValueError(f"ring_attention: the ranks were called with different arguments (rank {rank}: q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {q.dtype}, causal={causal}, "
                         f"layout={layout!r}); {_SAME_SHAPES}")
    steps = ring_schedule(world, rank, q.shape[-2], k.shape[-2], causal=causal, layout=layout)
    kv = _KVRing(group, xp, k, v)
    for t, blocks in enumerate(steps):
        if t + 1 < world:
            kv.send_on()                               # step t + 1's K/V travel while step t computes
        k, v = kv.in_hand
        for b in blocks:
            O_b, L_b = flash_attention(q[..., b.q, :], k[..., b.k, :], v[..., b.k, :], causal=b.causal,
                                       softmax_scale=scale, return_lse=True)
            O[..., b.q, :], L[..., b.q] = merge_attention(O[..., b.q, :], L[..., b.q], O_b.astype(acc), L_b)
        if t + 1 < world:
            kv.receive()
    O = O.astype(q.dtype, copy=False)
    return (O, L) if return_lse else O


_SAME_SHAPES = ("every rank must hold slices of one shape and dtype and pass the same causal and layout "
                "(shard the sequence with flashattn_cupy.distributed.shard)")


def _signature(q, k, v, causal: bool, layout: str) -> int:
    """What every rank must call ring_attention with alike, as one int for Group.agree."""
    text = repr([(tuple(x.shape), str(x.dtype)) for x in (q, k, v)] + [causal, layout])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def check_received(rank: int, sent: tuple, received: tuple) -> None:
    """ValueError when rank received arrays of other shapes than its own (a neighbour called with
    other slices): for communicators that move whatever they are given."""
    if [tuple(x.shape) for x in received] != [tuple(x.shape) for x in sent]:
        raise ValueError(f"ring_attention: rank {rank} holds k, v of shapes {[tuple(x.shape) for x in sent]} "
                         f"but received {[tuple(x.shape) for x in received]} from its neighbour; {_SAME_SHAPES}")


class _KVRing:
    """The K/V in hand and, with a group that has start/wait, the next on its way into the one of
    two receive buffers that is not being read: the in-hand pair is the caller's k, v at step 0 and
    buffer (t - 1) % 2 at step t, while buffer t % 2 receives. A buffer is written again two steps
    after it was read, and the group orders that after the reading kernels (its start is called
    once they are queued). Groups with exchange alone pass the K/V on after the step instead."""

    def __init__(self, group, xp, k, v):
        self.group, self.xp = group, xp
        self.in_hand = (k, v)
        self.overlap = hasattr(group, "start") and hasattr(group, "wait")
        self._buffers: list = [None, None]
        self._step = 0
        self._pending: Any = None

    def send_on(self) -> None:
        """Start passing the K/V in hand to rank + 1 and receiving rank - 1's (start/wait groups)."""
        if not self.overlap:
            return
        i = self._step % 2
        if self._buffers[i] is None:                  # one buffer for 2 ranks, two from 3 on
            self._buffers[i] = tuple(self.xp.empty(x.shape, x.dtype) for x in self.in_hand)
        recv = self._buffers[i]
        self._pending = (self.group.start(self.in_hand, recv), recv)

    def receive(self) -> None:
        """The next K/V in hand: once the transfer started by send_on is done, or by exchange."""
        if self.overlap:
            handle, recv = self._pending
            self.group.wait(handle)
            self._pending = None
        else:
            recv = tuple(self.group.exchange(self.in_hand))
            check_received(self.group.rank, self.in_hand, recv)
        self.in_hand = recv
        self._step += 1


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
