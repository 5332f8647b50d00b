"""The C twin against the float64 reference (tolerances.py argues the bounds)."""
import numpy as np
import pytest

from cases import HEAD_DIMS, inputs, size_cases
from flashattn_cupy import flash_attention, planner
from tolerances import assert_attention_close


def _check(q, k, v, compute="float32", **kw):
    O, L = flash_attention(q, k, v, return_lse=True, backend="c", **kw)
    assert type(O) is np.ndarray and O.dtype == q.dtype
    return assert_attention_close(O, L, q, k, v, compute=compute, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,d", size_cases())
def test_sizes(rng, Nq, Nk, d, causal):
    _check(*inputs(rng, (), Nq, Nk, d), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", HEAD_DIMS + (1, 255))
def test_head_dims(rng, d, causal):
    _check(*inputs(rng, (2,), 113, 203, d), causal=causal)


def test_batch_and_heads_dims(rng):
    _check(*inputs(rng, (2, 3), 33, 65, 40), causal=True)
    _check(*inputs(rng, (2, 1, 3), 17, 31, 16))


def test_custom_scale(rng):
    _check(*inputs(rng, (2,), 31, 33, 64), softmax_scale=0.37)
    _check(*inputs(rng, (2,), 31, 33, 64), softmax_scale=-1.5, causal=True)


def test_fully_masked_rows_give_zero_and_minus_inf(rng):
    q, k, v = inputs(rng, (2,), 50, 20, 32)   # causal with Nq > Nk: the first 30 rows see no key
    O, L = flash_attention(q, k, v, causal=True, return_lse=True, backend="c")
    assert (O[:, :30] == 0).all() and np.isneginf(L[:, :30]).all()
    assert np.isfinite(L[:, 30:]).all()
    _check(q, k, v, causal=True)


def test_large_scores_do_not_overflow(rng):
    # scores ~ 1e3 (exp would overflow float32 without the running max)
    q, k, v = inputs(rng, (2,), 64, 100, 64, magnitude=12.0)
    O, L = flash_attention(q, k, v, return_lse=True, backend="c")
    assert np.abs(L).max() > 200
    _check(q, k, v)
    _check(q, k, v, causal=True)


def test_float64(rng):
    q, k, v = inputs(rng, (3,), 113, 77, 59, dtype=np.float64)
    _check(q, k, v, compute="float64")
    _check(q, k, v, compute="float64", causal=True)


C_TILES = sorted({(t, t) for t in planner.TILE_CANDIDATES}
                 | {(Br, Bc) for _, Br, Bc in planner.C_TILE_FOR_HEAD_DIM})


@pytest.mark.parametrize("Br, Bc", C_TILES)
def test_every_tile_size(rng, Br, Bc):
    """The C twin takes any Br x Bc; the planner's shapes and the CUDA ones must all be right."""
    from flashattn_cupy import _c_backend
    from flashattn_cupy._validate import validate

    q, k, v = inputs(rng, (2,), 300, 270, 24)   # ragged last tiles for every shape
    problem = validate(q, k, v, causal=True, softmax_scale=None, return_lse=True, backend="c")
    plan = planner.Plan("c", "flash_fwd_f32", "float32", 24, 24, Br, Bc, True)
    O, L = _c_backend.run(problem, plan, q, k, v)
    assert_attention_close(O, L, q, k, v, causal=True)


def test_threads_give_the_same_result(rng):
    """The C call releases the GIL: calls from several threads must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    problems = [inputs(rng, (2,), 130, 150, 64) for _ in range(4)]
    expected = [flash_attention(*p) for p in problems]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: flash_attention(*p), problems * 2))
    for got, want in zip(results, expected * 2):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lead, num_threads, causal, dtype", [
    ((5,), 2, False, np.float32),       # 5 heads on 2 threads: slices of 2 and 3
    ((2, 3), 4, True, np.float32),      # 6 heads on 4 threads: slices of 1 and 2
    ((3,), 8, True, np.float32),        # more threads than heads: one head per thread
    ((), 2, False, np.float32),         # one head: one thread
    ((2, 2), 3, True, np.float64),
])
def test_num_threads_gives_bitwise_the_same_result(rng, lead, num_threads, causal, dtype):
    q, k, v = inputs(rng, lead, 77, 130, 40, dtype=dtype)
    O1, L1 = flash_attention(q, k, v, causal=causal, return_lse=True)
    O, L = flash_attention(q, k, v, causal=causal, return_lse=True, num_threads=num_threads)
    assert O.shape == O1.shape and L.shape == L1.shape
    np.testing.assert_array_equal(O, O1)
    np.testing.assert_array_equal(L, L1)
    assert_attention_close(O, L, q, k, v, compute=np.dtype(dtype).name, causal=causal)


def test_vectorized_exp_accuracy():
    """flash_exp_f32 (the C twin's exp for Pij) is within 2 ulp of exp on [-87.33, 0], the range
    it is used on (scores minus their max), and on [0, 88); below it flushes to 0 (|error| <
    FLT_MIN), -inf gives exactly 0, from 88 on +inf, NaN stays NaN, and the base is subtracted
    first."""
    from flashattn_cupy._c_backend import ffi, lib

    def exp(x, base=0.0):
        y = np.empty_like(x)
        lib.flash_exp_f32(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y), x.size, base)
        return y

    for x in (np.linspace(-87.33, 0, 2_000_001, dtype=np.float32),
              np.linspace(0, 87.999, 200_001, dtype=np.float32)):
        exact = np.exp(x.astype(np.float64))
        ulps = np.abs(exp(x) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
        assert ulps.max() <= 2.0, f"max error {ulps.max():.2f} ulp at x = {x[ulps.argmax()]}"
    special = np.array([-np.inf, -1e30, -100.0, -87.4, 0.0, np.nan, 88.0, 1e30, np.inf], dtype=np.float32)
    got = exp(special)
    assert got[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and got[4] == 1.0 and np.isnan(got[5])
    assert np.isposinf(got[6:]).all()
    np.testing.assert_array_equal(exp(x[::1000] + 3.0, 3.0), exp(x[::1000] + 3.0 - 3.0))
