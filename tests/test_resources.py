"""Concurrency and resources: calls from several threads (and, on the GPU, several streams at
once) give the results of serial calls, bit for bit; 10,000 calls grow neither host nor device
memory; an allocation the GPU cannot hold raises CuPy's OutOfMemoryError at once."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backends import FP32_OPTIONS, np_dtype
from cases import inputs
from flashattn_cupy import flash_attention

# Different shapes, dtypes and causal flags at once, so different plans and tiles run together
MIXED = [((2,), 130, 150, 64, False), ((3, 2), 77, 33, 40, True), ((1,), 300, 257, 128, True),
         ((4,), 17, 500, 16, False), ((2,), 64, 64, 256, True), ((), 1, 1000, 80, False),
         ((2, 2), 45, 99, 32, True)]


def _problems(rng, dtypes):
    return [(inputs(rng, lead, Nq, Nk, d, dtype=np_dtype(dtypes[n % len(dtypes)])), causal)
            for n, (lead, Nq, Nk, d, causal) in enumerate(MIXED)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_threads_give_the_serial_results(rng):
    """8 threads of calls, half of them splitting their heads over 2 threads of their own."""
    problems = _problems(rng, ("float32", "float64"))
    call = lambda p, n=1: flash_attention(*p[0], causal=p[1], return_lse=True, num_threads=n)  # noqa: E731
    expected = [call(p) for p in problems]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, problems * 4, [1, 2] * (2 * len(problems))))
    for (O, L), (O0, L0) in zip(results, expected * 4):
        assert O.tobytes() == O0.tobytes() and L.tobytes() == L0.tobytes()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
def test_ten_thousand_calls_do_not_grow_host_memory(rng):
    """After a warm-up, 10,000 more calls (on one thread, then on two) may not grow the resident
    set by 1 MiB: the C twin allocates eight tile buffers per call, so leaking even the smallest
    (a row vector of Br floats, 512 bytes at Br = 128) would show as 5 MiB, and keeping one small
    Python object per call as about 1 MiB. (Quiet runs grow by 0 to 8 KiB.)"""
    q, k, v = inputs(rng, (2,), 9, 17, 16)
    for num_threads in (1, 2):   # 2: each call also starts and joins a thread
        for _ in range(2000):
            flash_attention(q, k, v, causal=True, return_lse=True, num_threads=num_threads)
        before = _rss()
        for _ in range(10_000):
            flash_attention(q, k, v, causal=True, return_lse=True, num_threads=num_threads)
        assert _rss() - before < 2**20


@pytest.mark.gpu
def test_streams_and_threads_give_the_serial_results(cp, rng):
    """Every dtype, and float32 on each of its kernels, at once."""
    fp32 = iter(FP32_OPTIONS.values())
    problems = [(tuple(cp.asarray(x) for x in arrays), causal,
                 next(fp32) if arrays[0].dtype == np.float32 else {})
                for arrays, causal in _problems(rng, ("float32", "float16", "bfloat16"))]
    call = lambda p: flash_attention(*p[0], causal=p[1], return_lse=True, **p[2])  # noqa: E731
    expected = [call(p) for p in problems]
    cp.cuda.Device().synchronize()

    streams = [cp.cuda.Stream(non_blocking=True) for _ in problems]   # all in flight at once
    results = []
    for stream, p in zip(streams, problems):
        with stream:
            results.append(call(p))
    for stream in streams:
        stream.synchronize()

    def on_own_stream(p):
        with cp.cuda.Stream(non_blocking=True) as stream:
            out = call(p)
            stream.synchronize()
        return out

    with ThreadPoolExecutor(8) as pool:
        results += list(pool.map(on_own_stream, problems * 4))
    for got, want in zip(results, expected * 5):
        assert all(cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes() for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
def test_ten_thousand_gpu_calls_do_not_grow_memory(cp, rng):
    """CuPy in, CuPy out and NumPy in, NumPy out: after a warm-up, 10,000 calls each leave the
    memory pool's bytes in use where they were (every output freed), the pool no larger, the
    device's free memory within 2 MiB and the host's resident set within 4 MiB, no kernel module
    loaded again. The free memory is the device's, not this process's, so it is read only where
    this process runs alone (not as a pytest-xdist worker, whose siblings allocate meanwhile); the
    pool and the module count, checked always, are the two ways our calls reach device memory."""
    from flashattn_cupy import kernels
    alone = "PYTEST_XDIST_WORKER" not in os.environ
    pool = cp.get_default_memory_pool()
    host = inputs(rng, (2,), 9, 17, 16)
    device = [cp.asarray(x) for x in host]
    for args in (device, host):
        for _ in range(200):
            flash_attention(*args, causal=True, backend="cuda", return_lse=True)
        cp.cuda.Device().synchronize()
        used, held, free, rss = pool.used_bytes(), pool.total_bytes(), cp.cuda.runtime.memGetInfo()[0], _rss()
        modules = len(kernels._kernels)
        for _ in range(10_000):
            flash_attention(*args, causal=True, backend="cuda", return_lse=True)
        cp.cuda.Device().synchronize()
        assert pool.used_bytes() == used and pool.total_bytes() <= held and len(kernels._kernels) == modules
        if alone:
            assert free - cp.cuda.runtime.memGetInfo()[0] < 2 * 2**20
        assert _rss() - rss < 4 * 2**20


@pytest.mark.gpu
def test_out_of_memory_raises_cupys_error(cp, rng):
    """q, k, v broadcast over a batch so large that O alone needs twice the device's memory:
    the inputs cost nothing (zero stride), the output allocation fails with CuPy's error, and
    the next call runs normally."""
    total = cp.cuda.runtime.memGetInfo()[1]
    one = cp.asarray(inputs(rng, (1, 1), 128, 128, 128, dtype=np.float16)[0])
    batch = 2 * total // one.nbytes + 1
    huge = cp.broadcast_to(one, (batch, 1, 128, 128))
    with pytest.raises(cp.cuda.memory.OutOfMemoryError):
        flash_attention(huge, huge, huge)
    q, k, v = (cp.asarray(x) for x in inputs(rng, (2,), 33, 31, 64, dtype=np.float16))
    O = flash_attention(q, k, v)
    assert bool(cp.isfinite(O).all())
