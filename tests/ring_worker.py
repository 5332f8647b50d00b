"""One rank of test_ring_nccl.py's runs, started by the launcher: ring attention over real NCCL
(NcclGroup from init_from_env). It saves what it computed and recorded to OUT/rank<r>_<what>.npz;
the test, in its own process, builds the same inputs (inputs()), unshards and compares.

    python -m flashattn_cupy.distributed --nproc N tests/ring_worker.py OUT cases CASE...
        CASE = <causal|full>-<contiguous|zigzag>-<float32|float16>: this rank's slices of O, L.
    ... --nproc N tests/ring_worker.py OUT exchange
        every dtype, contiguous or not, through exchange(); agree() on equal and unequal values.
    ... --nproc 1 tests/ring_worker.py OUT overlap W
        a ring of W steps on one GPU: the real world-1 group claims world_size W, so each step's
        K/V go through NCCL back to this rank; the kernels' inputs and the receive buffer in flight
        are recorded as address ranges.
"""
import sys

import numpy as np

LEAD, D, CHUNK = (2, 3), 64, 37       # 2 world chunks of 37 rows: no tile multiple


def inputs(world: int, dtype: str, lead=LEAD, chunks=None):
    """The full q, k, v (NumPy) every rank and the test build alike."""
    n = (2 * world if chunks is None else chunks) * CHUNK
    rng = np.random.default_rng(1000 + world)
    return tuple((1.5 * rng.standard_normal(lead + (n, D))).astype(dtype) for _ in range(3))


def span(x) -> tuple[int, int]:
    """[low, high) bytes of device memory a CuPy array (or view) reaches."""
    low = x.data.ptr + sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s < 0)
    high = x.data.ptr + sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s > 0) + x.itemsize
    return low, high


def cases(group, out, names):
    import cupy as cp
    from flashattn_cupy.distributed import ring_attention, shard
    for name in names:
        mask, layout, dtype = name.split("-")
        q, k, v = (cp.asarray(shard(x, group.world_size, group.rank, layout=layout))
                   for x in inputs(group.world_size, dtype))
        O, L = ring_attention(q, k, v, causal=mask == "causal", layout=layout, return_lse=True, group=group)
        np.savez(f"{out}/rank{group.rank}_{name}.npz", O=cp.asnumpy(O), L=cp.asnumpy(L))


def exchange(group, out):
    import cupy as cp
    import ml_dtypes
    rng = np.random.default_rng(group.rank)
    sent, received = {}, {}
    for dtype in ("float32", "float16", ml_dtypes.bfloat16):
        x = cp.asarray(rng.standard_normal((3, 40, 24)).astype(dtype))
        for kind, y in (("contiguous", x), ("strided", x[:, 5:30:2, :]), ("transposed", x.transpose(2, 0, 1))):
            key = f"{np.dtype(dtype).name}-{kind}"
            got, = group.exchange((y,))
            assert got.dtype == y.dtype and got.shape == y.shape and got.flags.c_contiguous
            sent[key], received[key] = (cp.asnumpy(cp.ascontiguousarray(a)).view(np.uint8) for a in (y, got))
    agree = [group.agree(7), group.agree(group.rank)]
    np.savez(f"{out}/rank{group.rank}_exchange.npz", agree=np.array(agree),
             **{f"sent-{k}": a for k, a in sent.items()}, **{f"received-{k}": a for k, a in received.items()})


class PretendWorld:
    """The world-1 NcclGroup, claiming world_size W: ring_attention runs W steps, and every
    transfer goes through NCCL from this rank to itself. Records each start's receive buffers."""

    def __init__(self, group, world):
        self.group, self.rank, self.world_size, self.agree = group, 0, world, group.agree
        self.in_flight: list = []
        self.received_into: list = []

    def start(self, send, recv):
        transfer = self.group.start(send, recv)
        self.in_flight = [span(r) for r in recv]
        self.received_into.append([span(r) for r in recv])
        return transfer

    def wait(self, transfer):
        self.group.wait(transfer)
        self.in_flight = []


def overlap(group, out, world):
    import cupy as cp
    from flashattn_cupy.distributed import ring
    pretend = PretendWorld(group, world)
    calls = []           # per kernel call: (a transfer in flight, its inputs reach into the buffer)
    flash_attention = ring.flash_attention

    def spy(*args, **kwargs):
        touches = any(lo < hi2 and lo2 < hi for lo, hi in map(span, args) for lo2, hi2 in pretend.in_flight)
        calls.append((bool(pretend.in_flight), touches))
        return flash_attention(*args, **kwargs)

    ring.flash_attention = spy
    q, k, v = (cp.asarray(x) for x in inputs(world, "float32", chunks=world))
    O, L = ring.ring_attention(q, k, v, return_lse=True, group=pretend)
    np.savez(f"{out}/rank0_overlap.npz", O=cp.asnumpy(O), L=cp.asnumpy(L), calls=np.array(calls),
             received_into=np.array(pretend.received_into))


def main(out, what, *args):
    from flashattn_cupy.distributed import init_from_env
    group = init_from_env()
    if what == "cases":
        cases(group, out, args)
    elif what == "exchange":
        exchange(group, out)
    elif what == "overlap":
        overlap(group, out, int(args[0]))
    else:
        raise SystemExit(f"ring_worker.py: unknown task {what!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
