"""The ring schedule: at each step, which blocks of (local queries x keys in hand) a rank computes.

Ranks pass K/V to rank + 1, so at step t rank r holds the K/V slice of rank (r - t) mod world.
Each slice is one or two chunks of the sequence (sharding.py), all chunks of one length; under a
causal mask (total Nq == Nk, so query and key chunk c cover the same positions) a query chunk
sees an earlier key chunk whole, its own chunk causally (the diagonal: the kernel's mask, since
both start at one position) and a later chunk not at all, so that block is skipped. Blocks that
touch locally adjacent rows or keys are joined into one kernel call: keys fully seen followed
by the diagonal chunk make one causal (bottom-right aligned) block, and adjacent query chunks
seeing the same keys whole make one block.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sharding import chunk_ids, chunks_per_rank


@dataclass(frozen=True)
class Block:
    """Local query rows q and key rows k of one kernel call; causal: bottom-right aligned mask."""
    q: slice
    k: slice
    causal: bool

    def pairs(self) -> int:
        """(query, key) pairs the block computes: its work."""
        nq, nk = self.q.stop - self.q.start, self.k.stop - self.k.start
        if not self.causal:
            return nq * nk
        return nq * (nk - nq) + nq * (nq + 1) // 2    # nk >= nq: whole keys, then the diagonal


def ring_schedule(world: int, rank: int, n_q: int, n_k: int, *, causal: bool = False,
                  layout: str = "contiguous") -> list[list[Block]]:
    """The blocks rank computes at each of the world steps, for local slices of n_q query and
    n_k key rows. Causal needs n_q == n_k (ring.py checks)."""
    per = chunks_per_rank(layout)
    q_chunks = _chunks(chunk_ids(world, rank, layout), n_q // per)
    return [_step_blocks(q_chunks, _chunks(chunk_ids(world, (rank - t) % world, layout), n_k // per), causal)
            for t in range(world)]


def _chunks(ids, length):
    return [(c, slice(i * length, (i + 1) * length)) for i, c in enumerate(ids)]


def _step_blocks(q_chunks, k_chunks, causal: bool) -> list[Block]:
    blocks: list[Block] = []
    for qc, qs in q_chunks:
        row: list[Block] = []
        for kc, ks in k_chunks:                    # local order is sequence order in every layout
            if causal and kc > qc:
                continue
            diagonal = causal and kc == qc
            if row and not row[-1].causal and row[-1].k.stop == ks.start:
                row[-1] = Block(qs, slice(row[-1].k.start, ks.stop), diagonal)
            else:
                row.append(Block(qs, ks, diagonal))
        blocks += row
    joined: list[Block] = []
    for b in blocks:
        last = joined[-1] if joined else None
        if last and not (last.causal or b.causal) and last.k == b.k and last.q.stop == b.q.start:
            joined[-1] = Block(slice(last.q.start, b.q.stop), b.k, False)
        else:
            joined.append(b)
    return joined
