"""Scale, on the GPU: long sequences, and index spaces past 2**31 elements in every direction
(query rows, key rows, heads, batch), checked on sampled rows against the float64 reference
computed for those rows only (all keys they see). No 32-bit offset may overflow anywhere.

Random data alone cannot show a wrong read at Nk = 2**20: each row of O is then an average of a
million values, close to 0 whatever was read, and the argued bound (linear in Nk) is loose. So
the checked rows of the long problems get a needle: q_i = c e_a and one key k_j[a] = c on an axis
a of their own, scale c**2 = 24, v_j = ±1000, over background q, k ~ 0.25 N(0, 1), v ~ N(0, 1).
The needle's weight dominates (e**24 against at most 2**20 e**2), so O_i ≈ v_j and L_i ≈ 24,
while a wrong key or row gives O far from v_j (|error| ≈ 1000 or more), past the bound (about 500
for fp16 on the tensor cores at Nk = 2**20, and below 150 for every kernel at Nk = 2**16 + 5).
Problems with few keys per row use plain random data: their bound is tight. Each kernel family
runs: fp16 on the tensor cores, and float32 by default, on CUDA cores and as TF32.
"""
import math
import os
import tempfile
from contextlib import nullcontext

try:
    import fcntl
except ImportError:   # not POSIX: no machine-wide lock (the tests still run)
    fcntl = None

import numpy as np
import pytest

from backends import FP32_OPTIONS
from flashattn_cupy import flash_attention, plan_for
from tolerances import assert_attention_close, kernel_rounding

pytestmark = pytest.mark.gpu
GRID_LIMIT = 65535   # CUDA's gridDim.y/z: heads or batch beyond it take the kernels' grid-stride loop


@pytest.fixture(autouse=True)
def one_at_a_time(cp):
    """These tests hold up to 17 GB each. Under pytest-xdist (`-n 8`) several ran at once on an
    80 GB H100, and each worker's CuPy pool kept its blocks afterwards: 7 of them failed with
    OutOfMemoryError there (2026-12-05; alone they pass). So one runs at a time on a machine, by an
    exclusive lock on a file every worker opens, and each gives its memory back before letting go."""
    path = os.path.join(tempfile.gettempdir(), f"flashattn_cupy-scale-tests-{os.getuid()}.lock") if fcntl else None
    with open(path, "a") if path else nullcontext() as lock:
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            cp.get_default_memory_pool().free_all_blocks()
            if lock:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _random(cp, shape, dtype, scale=1.0, seed=0):
    x = cp.random.RandomState(seed).standard_normal(shape, dtype=cp.float32)
    x *= scale
    return x.astype(dtype, copy=False)


def _rounding(q, k, v, causal, options=None):
    return kernel_rounding(plan_for(q, k, v, causal=causal, **(options or {})))


def _seen(i, Nq, Nk, causal):
    return min(Nk, i + 1 + Nk - Nq) if causal else Nk


def _plant_needles(cp, q, k, v, index, rows, keys, seed):
    """Give row rows[n] of q[index] its needle at key keys[n] (see the module's docstring)."""
    d = q.shape[-1]
    c = math.sqrt(24 * math.sqrt(d))   # scale c**2 = 24 with the default scale 1 / sqrt(d)
    signs = np.random.default_rng(seed).choice([-1000.0, 1000.0], (len(rows), d))
    for n, (i, j) in enumerate(zip(rows, keys)):
        q[index + (i,)] = 0
        q[index + (i, n % d)] = c
        k[index + (j, n % d)] = c
        v[index + (j,)] = cp.asarray(signs[n], dtype=v.dtype)


def _check_rows(cp, O, L, q, k, v, index, rows, causal, rounding):
    """Rows `rows` of O[index], L[index] against the reference over the keys each sees."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    kh, vh = (cp.asnumpy(x[index]) for x in (k, v))
    for i in rows:
        seen = _seen(i, Nq, Nk, causal)
        O_i, L_i = cp.asnumpy(O[index + (slice(i, i + 1),)]), cp.asnumpy(L[index + (slice(i, i + 1),)])
        if seen <= 0:
            assert (O_i == 0).all() and np.isneginf(L_i).all(), f"row {i} sees no key"
            continue
        q_i = cp.asnumpy(q[index + (slice(i, i + 1),)])
        assert_attention_close(O_i, L_i, q_i, kh[:seen], vh[:seen], **rounding)


def _edge_rows(N, tile=128):
    return sorted({0, 1, tile - 1, tile, N // 2, N - tile - 1, N - 2, N - 1})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lead, N, d", [((1, 1), 2**20, 64), ((1, 32), 2**17, 128)])
def test_long_sequences(cp, lead, N, d, causal):
    q = _random(cp, lead + (N, d), cp.float16, 0.25, seed=1)
    k = _random(cp, lead + (N, d), cp.float16, 0.25, seed=2)
    v = _random(cp, lead + (N, d), cp.float16, seed=3)
    rows = sorted(set(_edge_rows(N)) | set(np.random.default_rng(4).choice(N, 8, replace=False).tolist()))
    heads = [(0, 0), (0, lead[1] - 1)] if lead[1] > 1 else [(0, 0)]
    rng = np.random.default_rng(5)
    for index in heads:   # each row's needle at a random key it sees
        keys = [int(rng.integers(0, _seen(i, N, N, causal))) for i in rows]
        _plant_needles(cp, q, k, v, index, rows, keys, seed=index[1])
    O, L = flash_attention(q, k, v, causal=causal, return_lse=True)
    for index in heads:
        _check_rows(cp, O, L, q, k, v, index, rows, causal, _rounding(q, k, v, causal))


# (FP32_OPTIONS key, dtype): each kernel family
KERNELS = [("cuda", "float16"), ("cuda", "float32"), ("cuda-simt", "float32"), ("cuda-tf32", "float32")]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel, dtype", KERNELS)
def test_query_rows_past_2_31_elements(cp, kernel, dtype, causal):
    """q and O of (1, 1, 2**24 + 100, 128): rows from 2**24 on start past element 2**31. With
    causal, only the last 64 rows see a key, so the rows before them must be O = 0, L = -inf."""
    Nq, Nk, d = 2**24 + 100, 64, 128
    q = _random(cp, (1, 1, Nq, d), dtype, seed=5)
    k, v = _random(cp, (1, 1, Nk, d), dtype, seed=6), _random(cp, (1, 1, Nk, d), dtype, seed=7)
    options = FP32_OPTIONS[kernel]
    O, L = flash_attention(q, k, v, causal=causal, return_lse=True, **options)
    rows = sorted({0, 2**24 - 1, 2**24, 2**24 + 1} | set(_edge_rows(Nq)))
    _check_rows(cp, O, L, q, k, v, (0, 0), rows, causal, _rounding(q, k, v, causal, options))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel, dtype", KERNELS)
def test_key_rows_past_2_31_elements(cp, kernel, dtype, causal):
    """k and v are (1, 1, 2**16 + 5, 128) views with a row stride of 2**15 elements into
    buffers of over 2**31 elements (read in place, as strided views are): the last keys start
    past element 2**31. Needles sit on those keys and on some low ones."""
    Nq, Nk, d, stride = 64, 2**16 + 5, 128, 2**15
    q = _random(cp, (1, 1, Nq, d), dtype, 0.25, seed=8)
    k, v = (cp.empty((1, 1, Nk, stride), dtype=dtype)[..., :d] for _ in range(2))
    k[...] = _random(cp, (1, 1, Nk, d), dtype, 0.25, seed=9)
    v[...] = _random(cp, (1, 1, Nk, d), dtype, seed=10)
    assert (Nk - 1) * k.strides[-2] // k.itemsize > 2**31
    # rows 59-63 get keys 2**16 .. 2**16 + 4 (row 59 + n sees them even when causal), the others low keys
    rows = list(range(Nq - 5, Nq)) + list(range(0, Nq - 5, 5))
    keys = [2**16 + n if n < 5 else 997 * n for n in range(len(rows))]
    assert all(j < _seen(i, Nq, Nk, causal) for i, j in zip(rows, keys))
    _plant_needles(cp, q, k, v, (0, 0), rows, keys, seed=14)
    options = FP32_OPTIONS[kernel]
    O, L = flash_attention(q, k, v, causal=causal, return_lse=True, **options)
    _check_rows(cp, O, L, q, k, v, (0, 0), rows, causal, _rounding(q, k, v, causal, options))


@pytest.mark.parametrize("lead, N, d, kernel, dtype", [
    ((1, 2**18 + 1), 64, 128, "cuda", "float16"),   # heads past the grid limit and past 2**31 elements
    ((2**16 + 1, 4), 64, 128, "cuda", "float16"),   # batch likewise
    ((1, 2**22 + 1), 16, 32, "cuda", "float32"),
    ((2**16 + 1, 64), 16, 32, "cuda-simt", "float32"),
])
def test_heads_and_batch_past_2_31_elements(cp, lead, N, d, kernel, dtype):
    q, k, v = (_random(cp, lead + (N, d), dtype, seed=s) for s in (11, 12, 13))
    options = FP32_OPTIONS[kernel]
    O, L = flash_attention(q, k, v, return_lse=True, **options)
    per = N * d
    assert q.size > 2**31
    flat = {0, math.prod(lead) - 1, 2**31 // per - 1, 2**31 // per, -(-2**31 // per)}
    for dim, size in enumerate(lead):
        if size > GRID_LIMIT:
            inner = math.prod(lead[dim + 1:])
            flat |= {m * inner for m in (GRID_LIMIT - 1, GRID_LIMIT, GRID_LIMIT + 1)}
    rounding = _rounding(q, k, v, False, options)
    for f in sorted(flat):
        index = tuple(int(i) for i in np.unravel_index(f, lead))
        host = [cp.asnumpy(x[index]) for x in (q, k, v, O, L)]
        assert_attention_close(host[3], host[4], *host[:3], **rounding)
