"""NcclGroup: ring.Group over NCCL, through CuPy's cupyx.distributed (its NCCLBackend), one
process per GPU; init_from_env() makes one in a process the launcher started.

A ring step's exchange is one NCCL group of sends to rank + 1 and receives from rank - 1 (NCCL
pairs them; sends alone would wait on each other round the ring), queued on a stream of the
group's own. start() first makes that stream wait for an event recorded on the caller's current
stream: the transfer reads the arrays it sends only after the kernels queued before it wrote
them, and writes the receive buffers only after the kernels queued before it read them. wait()
makes the caller's stream wait for an event recorded after the transfer. So a step's kernels and
the next step's transfer run at once, ordered on the GPU alone: neither blocks the host.
agree() does, once per ring_attention call: a 16-byte all-reduce on the group's stream, read back.

Arrays travel as raw bytes (NCCL's uint8), so every dtype goes, bfloat16 included.
"""
from __future__ import annotations

import atexit
from typing import Any

from .. import _device
from .launch import world_from_env

NCCL_HINT = ("install NCCL for CuPy: pip install nvidia-nccl-cu12 (CUDA 12) or nvidia-nccl-cu13 "
             "(CUDA 13), matching your cupy-cuda12x or cupy-cuda13x")


class _Transfer:
    """A started exchange: the event after it, and the arrays it reads (kept alive until wait)."""

    def __init__(self, done: Any, send: tuple):
        self.done, self.send = done, send


class NcclGroup:
    """ring.Group over a cupyx.distributed NCCLBackend: rank, world_size, exchange, start/wait
    (on a stream of its own) and agree. Made by init_from_env() or init_process_group(); wrap a
    backend of your own with NcclGroup(backend, world_size), its GPU the current device."""

    def __init__(self, backend: Any, world_size: int):
        cp = _device.cupy()
        self.backend, self.rank, self.world_size = backend, backend.rank, world_size
        self.device = cp.cuda.Device().id
        self.stream = cp.cuda.Stream(non_blocking=True)   # the transfers'; never the caller's

    def start(self, send: tuple, recv: tuple) -> _Transfer:
        cp = _device.cupy()
        from cupy.cuda import nccl
        if cp.cuda.Device().id != self.device:
            raise ValueError(f"NcclGroup of rank {self.rank} belongs to GPU {self.device}, but GPU "
                             f"{cp.cuda.Device().id} is current; call it under `with cupy.cuda.Device({self.device})`")
        send = tuple(cp.ascontiguousarray(x) for x in send)   # NCCL reads contiguous memory
        for s, r in zip(send, recv, strict=True):
            if r.shape != s.shape or r.dtype != s.dtype or not r.flags.c_contiguous:
                raise ValueError(f"NcclGroup.start receives into contiguous buffers of the sent arrays' shapes and "
                                 f"dtypes; got {r.dtype} {tuple(r.shape)} for {s.dtype} {tuple(s.shape)}")
        ready = cp.cuda.Event(disable_timing=True)
        ready.record()                                  # on the caller's stream
        self.stream.wait_event(ready)
        to, frm = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        nccl.groupStart()
        try:
            for s, r in zip(send, recv):
                if s.nbytes:
                    self.backend.send(_bytes(s), to, stream=self.stream)
                    self.backend.recv(_bytes(r), frm, stream=self.stream)
        finally:
            nccl.groupEnd()
        done = cp.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return _Transfer(done, send)

    def wait(self, transfer: _Transfer) -> None:
        _device.cupy().cuda.get_current_stream().wait_event(transfer.done)
        transfer.send = ()                              # its copies may go: later work waits for the transfer

    def exchange(self, arrays: tuple) -> tuple:
        cp = _device.cupy()
        recv = tuple(cp.empty(x.shape, x.dtype) for x in arrays)
        self.wait(self.start(arrays, recv))
        return recv

    def agree(self, value: int) -> bool:
        cp = _device.cupy()
        with self.stream:                               # the host waits for this all-reduce alone
            x = cp.array([value, -value], dtype=cp.int64)
            self.backend.all_reduce(x, x, op="max", stream=self.stream)
            high, minus_low = (int(y) for y in x.get(stream=self.stream))
        return high == -minus_low

    def close(self) -> None:
        """Stop CuPy's rendezvous server (rank 0's TCP store), so that the process can exit."""
        self.backend.stop()


def _bytes(x):
    return x.reshape(-1).view(_device.cupy().uint8)


def init_process_group(world_size: int, rank: int, *, host: str = "127.0.0.1", port: int = 13333) -> NcclGroup:
    """This process's NcclGroup in a world of world_size processes, on the current GPU: every
    rank calls it with the same host and port, where rank 0 holds the rendezvous."""
    _device.cupy()
    from cupy.cuda import nccl
    if not nccl.available:
        raise _device.BackendUnavailableError(f"ring attention over NCCL: NCCL is not available to CuPy; {NCCL_HINT}")
    import cupyx.distributed
    group = NcclGroup(cupyx.distributed.init_process_group(world_size, rank, host=host, port=port), world_size)
    atexit.register(group.close)
    return group


def init_from_env() -> NcclGroup:
    """The communicator of a process the launcher started (python -m flashattn_cupy.distributed):
    selects GPU LOCAL_RANK as the current device and joins the world of RANK, WORLD_SIZE at
    MASTER_ADDR:MASTER_PORT."""
    rank, world, local, host, port = world_from_env()
    cp = _device.cupy()
    count = cp.cuda.runtime.getDeviceCount()
    if local >= count:
        raise ValueError(f"LOCAL_RANK={local}, but this host has {count} GPUs: start at most {count} processes "
                         f"per host (--nproc {count})")
    cp.cuda.Device(local).use()
    return init_process_group(world, rank, host=host, port=port)
