"""LocalRing: world ranks of a ring simulated by threads of one process, for tests.

The ranks run in lockstep as over NCCL: each computes its step, then all exchange together.
A transfer copies the arrays into the receiver's own buffers, as a transport does, so no rank
ever reads memory another rank can still write; every transfer is logged.

start/wait follow NCCL's contract strictly enough to catch a caller that breaks it: start
delivers at once (the data lands in the receive buffers while the caller goes on computing, as
it may on a GPU), and wait checks that, meanwhile, nobody wrote into the sent arrays or the
receive buffers.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from .ring import check_received
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


class _Transfer:
    """A started exchange: what was sent and received, to check at wait."""

    def __init__(self, send: tuple, sent: tuple, recv: tuple, received: tuple):
        self.send, self.sent, self.recv, self.received = send, sent, recv, received


class _LocalRank:
    def __init__(self, ring: LocalRing, rank: int):
        self._ring, self.rank, self.world_size = ring, rank, ring.world_size
        self._step = 0

    def _all(self, item: Any) -> list:
        """Every rank's item, rank by rank: each posts its own, every rank together."""
        ring = self._ring
        ring._mailbox[self.rank] = item
        ring._barrier.wait()                          # every rank has posted
        items = list(ring._mailbox)
        ring._barrier.wait()                          # every rank has read: mailboxes reusable
        return items

    def start(self, send: tuple, recv: tuple) -> _Transfer:
        sent = tuple(array_module(x).array(x, copy=True) for x in send)
        with self._ring._lock:
            self._ring.log.append((self._step, self.rank, (self.rank + 1) % self.world_size))
        received = self._all(sent)[(self.rank - 1) % self.world_size]
        check_received(self.rank, recv, received)
        for buffer, x in zip(recv, received):
            if buffer.dtype != x.dtype:
                raise ValueError(f"LocalRing: rank {self.rank} receives {x.dtype} into a {buffer.dtype} buffer")
            buffer[...] = x
        self._step += 1
        return _Transfer(send, sent, recv, received)

    def wait(self, transfer: _Transfer) -> None:
        for what, arrays, expected in (("sent", transfer.send, transfer.sent),
                                       ("receive buffer", transfer.recv, transfer.received)):
            for x, y in zip(arrays, expected):
                if x.tobytes() != y.tobytes():
                    raise RuntimeError(f"LocalRing: rank {self.rank} changed a {what} array between start and "
                                         "wait; a transport may still be reading or writing it then")

    def exchange(self, arrays: tuple) -> tuple:
        recv = tuple(array_module(x).empty(x.shape, x.dtype) for x in arrays)
        self.wait(self.start(arrays, recv))
        return recv

    def agree(self, value: int) -> bool:
        return len(set(self._all(value))) == 1
