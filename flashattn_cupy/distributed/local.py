"""LocalRing: world ranks of a ring simulated by threads of one process, for tests.

The ranks run in lockstep as over NCCL: each computes its step, then all exchange together.
An exchange copies the arrays into the receiver's own buffers, as a transport does, so no rank
ever reads memory another rank can still write; every transfer is logged.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from .sharding import array_module


class LocalRing:
    """run(fn) calls fn(group) on world_size threads, one per rank; group is a ring.Group."""

    def __init__(self, world_size: int):
        if not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"LocalRing needs world_size >= 1, got {world_size!r}")
        self.world_size = world_size
        self.log: list[tuple[int, int, int]] = []   # (step, sender, receiver) of every transfer
        self._barrier = threading.Barrier(world_size)
        self._mailbox: list[Any] = [None] * world_size
        self._lock = threading.Lock()

    def run(self, fn: Callable[[Any], Any]) -> list:
        """[fn(group of rank r) for r in range(world_size)], the ranks running together. The first
        error a rank raises is raised here (the others are released, not left waiting)."""
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def rank_main(rank):
            try:
                results[rank] = fn(_LocalRank(self, rank))
            except threading.BrokenBarrierError:
                pass                                  # another rank failed first
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier.reset()
        if errors:
            raise errors[0]
        return results


class _LocalRank:
    def __init__(self, ring: LocalRing, rank: int):
        self._ring, self.rank, self.world_size = ring, rank, ring.world_size
        self._step = 0

    def exchange(self, arrays: tuple) -> tuple:
        ring, world = self._ring, self.world_size
        ring._mailbox[self.rank] = tuple(array_module(x).array(x, copy=True) for x in arrays)
        with ring._lock:
            ring.log.append((self._step, self.rank, (self.rank + 1) % world))
        ring._barrier.wait()                          # every rank has sent
        received = ring._mailbox[(self.rank - 1) % world]
        ring._barrier.wait()                          # every rank has received: mailboxes reusable
        self._step += 1
        return received
