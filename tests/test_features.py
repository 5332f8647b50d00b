"""Sliding windows, softcap and ALiBi (csrc/fa_mask.cuh's definitions) on every backend.

The oracle here is a brute-force float64 masked softmax, written per head with an explicit
(Nq, Nk) matrix of -inf outside the window, sharing no code with reference.py; the C twin and
the reference are both checked against it, and the CUDA kernels (marked gpu) against the
reference with tolerances.py's bounds (whose softcap and ALiBi terms are argued there).
"""
import dataclasses
import math

import numpy as np
import pytest

import kernel_model
from backends import BACKEND_DTYPES, np_dtype, run
from cases import inputs
from flashattn_cupy import _c_backend, _cuda_backend, flash_attention, plan_for, planner
from flashattn_cupy._validate import validate
from tolerances import assert_attention_close, bounds, kernel_rounding


def brute(q, k, v, *, scale=None, causal=False, window=None, softcap=0.0, slopes=None):
    """(O, L) float64 by the definition, one (batch, head) at a time; k, v may have fewer heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lead, (Nq, d), Nk = q.shape[:-2], q.shape[-2:], k.shape[-2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    left, right = window or (-1, -1)
    if causal:
        right = 0
    slopes = None if slopes is None else np.broadcast_to(np.asarray(slopes, np.float64), lead)
    O, L = np.zeros(q.shape), np.full(lead + (Nq,), -np.inf)
    heads, kv_heads = (lead[-1], k.shape[-3]) if lead else (1, 1)
    for index in np.ndindex(*lead):
        kv_index = index[:-1] + (index[-1] // (heads // kv_heads),) if index else ()
        S = np.full((Nq, Nk), -np.inf)
        for i in range(Nq):
            diag = i + Nk - Nq
            for j in range(Nk):
                if (left >= 0 and j < diag - left) or (right >= 0 and j > diag + right):
                    continue
                x = scale * float(q[index][i] @ k[kv_index][j])
                if softcap > 0:
                    x = softcap * math.tanh(x / softcap)
                if slopes is not None:
                    x -= slopes[index] * abs(diag - j)
                S[i, j] = x
        for i in range(Nq):
            if np.isneginf(S[i]).all():
                continue   # no key: O = 0, L = -inf
            m = S[i].max()
            p = np.exp(S[i] - m)
            O[index][i] = p @ v[kv_index] / p.sum()
            L[index][i] = m + math.log(p.sum())
    return O, L


def _check_against_brute(O, L, q, k, v, *, compute, scale=None, causal=False, window=None, softcap=0.0,
                         slopes=None):
    """|O - O_brute| and |L - L_brute| within tolerances.bounds, -inf rows exactly O = 0, L = -inf."""
    softcap = float(np.float32(softcap))
    O_b, L_b = brute(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, slopes=slopes)
    tol_O, tol_L = bounds(q, k, v, softmax_scale=scale, compute=compute, out=np.dtype(q.dtype).name,
                          softcap=softcap, alibi_slopes=slopes)
    O, L = np.asarray(O, np.float64), np.asarray(L)
    empty = np.isneginf(L_b)
    assert L.dtype == np.float32 and np.array_equal(np.isneginf(L), empty)
    assert (O[empty] == 0).all() and not np.isnan(O).any()
    assert np.abs(O - O_b).max() <= tol_O
    assert np.abs(L[~empty] - L_b[~empty]).max(initial=0) <= tol_L


# (Nq, Nk, d, window): N not a multiple of any tile, Nq != Nk both ways, one row, one key,
# windows that empty rows ((0, 0) with Nq > Nk: the first Nq - Nk rows see none), (0, 0),
# one-sided, sides wider than N, and windows whose tiles the C twin skips (Nk >> window)
SHAPES_WINDOWS = [
    (1, 1, 40, (0, 0)), (1, 77, 40, (3, 0)), (1, 77, 80, (0, -1)), (77, 1, 40, (0, 0)), (77, 1, 80, (-1, 2)),
    (33, 33, 40, (0, 0)), (129, 200, 80, (5, 3)), (200, 129, 40, (0, 0)), (200, 129, 80, (2, 7)),
    (150, 300, 40, (-1, 4)), (300, 150, 40, (7, -1)), (64, 64, 80, (1000, 1000)), (65, 300, 40, (1000, 0)),
    (300, 301, 80, (0, 300)), (257, 1000, 40, (16, 16)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Nq, Nk, d, window", SHAPES_WINDOWS)
def test_windows_on_the_c_twin_and_the_reference(rng, dtype, Nq, Nk, d, window):
    q, k, v = inputs(rng, (2,), Nq, Nk, d, dtype=dtype)
    compute = np.dtype(dtype).name
    for causal in (False, True):
        O, L = flash_attention(q, k, v, window=window, causal=causal, return_lse=True, backend="c")
        _check_against_brute(O, L, q, k, v, compute=compute, causal=causal, window=window)
        O_r, L_r = flash_attention(q, k, v, window=window, causal=causal, return_lse=True, backend="reference")
        _check_against_brute(O_r, L_r, q, k, v, compute="float64", causal=causal, window=window)


# (Nq, Nk, d, lead, kv heads, causal, window, softcap, ALiBi slopes: None, "heads" or "lead")
MODDED = [
    (50, 70, 40, (2, 4), 4, False, None, 5.0, None),
    (70, 50, 80, (2, 4), 2, True, None, 0.5, None),        # softcap with causal, GQA
    (33, 97, 40, (2, 6), 2, False, None, 0.0, "heads"),    # ALiBi with GQA
    (97, 33, 40, (2, 6), 3, True, None, 0.0, "lead"),
    (129, 129, 80, (3,), 1, False, (16, 0), 2.0, "heads"),  # everything, MQA
    (1, 200, 40, (2, 2), 1, False, (30, -1), 20.0, "lead"),
    (200, 1, 80, (4,), 4, False, (0, 0), 1.0, "heads"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Nq, Nk, d, lead, kv_heads, causal, window, softcap, alibi", MODDED)
def test_softcap_and_alibi_on_the_c_twin_and_the_reference(rng, dtype, Nq, Nk, d, lead, kv_heads, causal, window,
                                                           softcap, alibi):
    q = (3 * rng.standard_normal(lead + (Nq, d))).astype(dtype)   # scores of several units: the cap bites
    k, v = (rng.standard_normal(lead[:-1] + (kv_heads, Nk, d)).astype(dtype) for _ in range(2))
    slopes = None if alibi is None else rng.uniform(0, 1, lead[-1:] if alibi == "heads" else lead).astype(np.float32)
    kw = dict(causal=causal, window=window, softcap=softcap)
    O, L = flash_attention(q, k, v, alibi_slopes=slopes, return_lse=True, backend="c", **kw)
    _check_against_brute(O, L, q, k, v, compute=np.dtype(dtype).name, slopes=slopes, **kw)
    O_r, L_r = flash_attention(q, k, v, alibi_slopes=slopes, return_lse=True, backend="reference", **kw)
    _check_against_brute(O_r, L_r, q, k, v, compute="float64", slopes=slopes, **kw)


@pytest.mark.parametrize("scale", [-0.7, 0.05, 0.0])
def test_custom_scales_with_the_mods(rng, scale):
    """softcap and ALiBi act on x = scale * q.k: a negative or zero scale too."""
    q, k, v = inputs(rng, (2, 3), 45, 60, 24, magnitude=2.0)
    slopes = rng.uniform(0, 1, 3).astype(np.float32)
    kw = dict(window=(20, 3), softcap=1.5)
    O, L = flash_attention(q, k, v, softmax_scale=scale, alibi_slopes=slopes, return_lse=True, **kw)
    _check_against_brute(O, L, q, k, v, compute="float32", scale=scale, slopes=slopes, **kw)


def test_softcap_saturates_and_alibi_prefers_near_keys(rng):
    """What the mods are for: a huge score is capped (every key weighs about the same when
    softcap is tiny), and a steep slope leaves only the diagonal key."""
    q, k, _ = inputs(rng, (2,), 20, 20, 16, magnitude=30.0)   # scores up to ~10^4
    v = inputs(rng, (2,), 20, 20, 16)[2]
    O = flash_attention(q, k, v, softcap=1e-3)   # scores within +-1e-3: weights within 0.2% of equal
    np.testing.assert_allclose(O, np.broadcast_to(v.mean(axis=-2, keepdims=True), O.shape), atol=1e-2)
    q, k, v = inputs(rng, (2,), 20, 20, 16)
    O = flash_attention(q, k, v, alibi_slopes=[1e4, 1e4])
    np.testing.assert_array_equal(O, v)


def test_num_threads_slice_the_slopes(rng):
    q, k, v = inputs(rng, (3, 4), 40, 60, 24)
    slopes = rng.uniform(0, 1, (3, 4)).astype(np.float32)
    kw = dict(alibi_slopes=slopes, window=(10, 2), softcap=3.0, return_lse=True)
    O1, L1 = flash_attention(q, k, v, **kw)
    for threads in (2, 5, 12):
        O, L = flash_attention(q, k, v, num_threads=threads, **kw)
        np.testing.assert_array_equal(O, O1)
        np.testing.assert_array_equal(L, L1)


def test_window_that_sees_everything_is_no_window(rng):
    """Sides that reach every key normalize to -1: bitwise the plain (or causal) call."""
    q, k, v = inputs(rng, (2,), 40, 70, 32)
    np.testing.assert_array_equal(flash_attention(q, k, v, window=(69, 39)), flash_attention(q, k, v))
    np.testing.assert_array_equal(flash_attention(q, k, v, window=(10**12, 0)), flash_attention(q, k, v, causal=True))
    np.testing.assert_array_equal(flash_attention(q, k, v, window=(-1, 0)), flash_attention(q, k, v, causal=True))


@pytest.mark.parametrize("window, causal, Nq, Nk, expected", [
    (None, False, 10, 20, (-1, -1)), (None, True, 10, 20, (-1, 0)), ((3, 5), True, 10, 20, (3, 0)),
    ((3, -1), True, 10, 20, (3, 0)), ((19, 9), False, 10, 20, (-1, -1)), ((18, 8), False, 10, 20, (18, 8)),
    ((0, 0), False, 1, 1, (-1, -1)), ((0, 0), True, 1, 5, (0, -1)), ([2, 3], False, 10, 20, (2, 3)),
    ((np.int64(2), np.int32(3)), False, 10, 20, (2, 3)), ((5, 0), True, 1, 3, (-1, -1)),
])
def test_window_normalization(window, causal, Nq, Nk, expected):
    q, k = np.zeros((2, Nq, 8), np.float32), np.zeros((2, Nk, 8), np.float32)
    problem = validate(q, k, k, causal=causal, softmax_scale=None, return_lse=False, backend="c", window=window)
    assert problem.window == expected and all(type(w) is int for w in problem.window)


def test_softcap_and_slopes_are_normalized(rng):
    q, k, v = inputs(rng, (2, 3), 5, 6, 8)
    problem = validate(q, k, v, causal=False, softmax_scale=None, return_lse=False, backend="c", softcap=0.1,
                       alibi_slopes=[1, 2, 3])
    assert problem.softcap == float(np.float32(0.1)) != 0.1
    assert problem.alibi.dtype == np.float32 and problem.alibi.shape == (2, 3) and problem.alibi.flags.c_contiguous
    np.testing.assert_array_equal(problem.alibi, [[1, 2, 3], [1, 2, 3]])
    for slopes in (np.arange(6.0).reshape(2, 3), np.arange(3, dtype=np.float16), np.arange(3.0)[::-1]):
        problem = validate(q, k, v, causal=False, softmax_scale=None, return_lse=False, backend="c",
                           alibi_slopes=slopes)
        np.testing.assert_array_equal(problem.alibi, np.broadcast_to(slopes, (2, 3)))
        assert problem.alibi.dtype == np.float32 and problem.alibi.flags.c_contiguous
    two_d = np.zeros((5, 8), np.float32)   # no leading dims: one head
    for slopes in ([0.5], np.array(0.5, np.float32)):
        problem = validate(two_d, two_d, two_d, causal=False, softmax_scale=None, return_lse=False, backend="c",
                           alibi_slopes=slopes)
        assert problem.alibi.shape == () and problem.alibi == 0.5


def test_the_cuda_path_passes_the_mods_to_the_kernel(rng, monkeypatch):
    """Without a GPU: the launch arguments, read as the kernels read them (kernel_model.py),
    compute the reference's answer; the plan is the mask variant (MASK 2 for score mods)."""
    q = rng.standard_normal((2, 6, 45, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 70, 16)).astype(np.float32) for _ in range(2))
    slopes = rng.uniform(0, 1, 6).astype(np.float32)
    for kw in (dict(window=(4, 2)), dict(causal=True, softcap=1.5), dict(window=(9, -1), alibi_slopes=slopes),
               dict(window=(0, 0))):
        launches = []
        kernel_model.use(monkeypatch, launches)
        problem = dataclasses.replace(validate(q, k, v, softmax_scale=None, return_lse=True, backend="c",
                                               **{"causal": False, **kw}), backend="cuda")
        plan = planner.plan(45, 70, 16, batch=2, heads=6, smem_limit=100 * 1024, arch=80,
                            **_cuda_backend.mask_options(problem))
        assert plan.mask == (2 if "softcap" in kw or "alibi_slopes" in kw else 1)
        O, L = _cuda_backend.run(problem, plan, 0)
        ref_kw = {**kw, "alibi_slopes": None if "alibi_slopes" not in kw else np.broadcast_to(slopes, (2, 6))}
        assert_attention_close(O, L, q, k, v, compute="float64", **ref_kw)
        [launch] = launches
        assert launch["softcap"] == np.float32(kw.get("softcap", 0.0))


# (id, keyword arguments, exception, words the message must contain)
ERRORS = [
    ("window an int", dict(window=5), TypeError, "window must be None or a pair of ints"),
    ("window of one", dict(window=(1,)), TypeError, "window must be None or a pair of ints"),
    ("window of floats", dict(window=(1.0, 2)), TypeError, "window must be None or a pair of ints"),
    ("window of bools", dict(window=(True, 0)), TypeError, "window must be None or a pair of ints"),
    ("window a string", dict(window="ab"), TypeError, "window must be None or a pair of ints"),
    ("window left -2", dict(window=(-2, 0)), ValueError, "left must be >= 0"),
    ("window right -5", dict(window=(3, -5)), ValueError, "right must be >= 0"),
    ("softcap a string", dict(softcap="1"), TypeError, "softcap must be a real number"),
    ("softcap a bool", dict(softcap=True), TypeError, "softcap must be a real number"),
    ("softcap None", dict(softcap=None), TypeError, "softcap must be a real number"),
    ("softcap negative", dict(softcap=-1.0), ValueError, "softcap must be 0 (off) or a positive finite"),
    ("softcap nan", dict(softcap=float("nan")), ValueError, "softcap must be 0 (off) or a positive finite"),
    ("softcap inf", dict(softcap=math.inf), ValueError, "softcap must be 0 (off) or a positive finite"),
    ("softcap 10**400", dict(softcap=10**400), ValueError, "softcap must be 0 (off) or a positive finite"),
    ("softcap float32 inf", dict(softcap=1e39), ValueError, "is inf in float32"),
    ("softcap float32 zero", dict(softcap=1e-50), ValueError, "is 0 in float32"),
    ("slopes a float", dict(alibi_slopes=0.5), TypeError, "alibi_slopes must be None or an array"),
    ("slopes of heads - 1", dict(alibi_slopes=np.ones(3, np.float32)), ValueError,
     "alibi_slopes must have shape (4,) (one slope per head) or (2, 4)"),
    ("slopes with a trailing 1", dict(alibi_slopes=np.ones((2, 4, 1), np.float32)), ValueError, "got (2, 4, 1)"),
    ("slopes per batch only", dict(alibi_slopes=np.ones((2, 1), np.float32)), ValueError, "got (2, 1)"),
    ("slopes complex", dict(alibi_slopes=np.ones(4, np.complex64)), TypeError, "real numbers"),
    ("slopes bool", dict(alibi_slopes=np.ones(4, bool)), TypeError, "real numbers"),
    ("slopes strings", dict(alibi_slopes=["a"] * 4), TypeError, "real numbers"),
    ("slopes nan", dict(alibi_slopes=[0.5, np.nan, 0.5, 0.5]), ValueError, "alibi_slopes must be finite"),
    ("slopes inf", dict(alibi_slopes=np.array([0.5, 0.5, -np.inf, 0.5])), ValueError, "must be finite"),
    ("slopes beyond float32", dict(alibi_slopes=[1e39, 0, 0, 0]), ValueError, "beyond float32's range"),
]


@pytest.mark.parametrize("kwargs, exc, words", [pytest.param(*case[1:], id=case[0]) for case in ERRORS])
def test_errors_before_any_backend_runs(rng, monkeypatch, kwargs, exc, words):
    def fail(*args, **kw):
        raise AssertionError("a backend ran")
    monkeypatch.setattr(_c_backend, "run", fail)
    q, k, v = inputs(rng, (2, 4), 8, 8, 16)
    before = [x.copy() for x in (q, k, v)]
    with pytest.raises(exc) as info:
        flash_attention(q, k, v, **kwargs)
    assert words in str(info.value)
    with pytest.raises(exc):
        plan_for(q, k, v, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip((q, k, v), before))


@pytest.mark.gpu
def test_cupy_slopes_with_numpy_arrays_or_another_gpu_are_refused(rng, cp):
    q, k, v = inputs(rng, (2, 4), 8, 8, 16)
    with pytest.raises(TypeError, match="alibi_slopes is a CuPy array and q, k, v are NumPy"):
        flash_attention(q, k, v, alibi_slopes=cp.ones(4, cp.float32))
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            slopes = cp.ones(4, cp.float32)
        with pytest.raises(ValueError, match="alibi_slopes is on GPU 1"):
            flash_attention(*map(cp.asarray, (q, k, v)), alibi_slopes=slopes)


# The GPU: every dtype and float32 kernel against the reference. (Nq, Nk, d, lead, kv heads,
# causal, window, softcap, ALiBi)
GPU_CASES = [
    (77, 203, 40, (2, 4), 4, False, (16, 5), 0.0, None),
    (203, 77, 80, (2, 4), 4, False, (0, 0), 0.0, None),      # rows that see no key
    (300, 300, 64, (2, 4), 2, False, (31, 31), 0.0, None),   # tiles skipped
    (113, 203, 40, (2, 4), 4, True, None, 5.0, None),        # softcap with causal
    (203, 113, 128, (1, 8), 2, True, (50, -1), 1.0, None),
    (77, 203, 40, (2, 6), 2, False, None, 0.0, "heads"),     # ALiBi with GQA
    (203, 77, 80, (2, 6), 3, True, None, 0.0, "lead"),
    (129, 257, 96, (2, 4), 1, False, (40, 8), 8.0, "lead"),  # all three, MQA
    (1, 300, 256, (2, 2), 2, False, (100, 0), 2.0, "heads"),
]


@pytest.mark.parametrize("backend, dtype", [p for p in BACKEND_DTYPES if p.id.startswith("cuda")])
@pytest.mark.parametrize("Nq, Nk, d, lead, kv_heads, causal, window, softcap, alibi", GPU_CASES)
def test_cuda_against_the_reference(rng, backend, dtype, Nq, Nk, d, lead, kv_heads, causal, window, softcap, alibi):
    q = (2 * rng.standard_normal(lead + (Nq, d))).astype(np_dtype(dtype))
    k, v = (rng.standard_normal(lead[:-1] + (kv_heads, Nk, d)).astype(np_dtype(dtype)) for _ in range(2))
    slopes = None if alibi is None else rng.uniform(0, 1, lead[-1:] if alibi == "heads" else lead).astype(np.float32)
    kw = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    O, L, rounding = run(backend, q, k, v, **kw)
    assert_attention_close(O, L, q, k, v, **kw, **rounding)


@pytest.mark.parametrize("backend, dtype", [p for p in BACKEND_DTYPES if p.id.startswith("cuda")])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_cuda_custom_scales_with_the_mods(rng, backend, dtype, scale):
    """The tensor-core kernel folds a negative scale into Qi's sign and scales scores itself
    with score mods: softcap and ALiBi must see scale * q.k all the same."""
    q, k, v = inputs(rng, (2, 4), 77, 130, 64, dtype=np_dtype(dtype), magnitude=2.0)
    kw = dict(softmax_scale=scale, window=(50, 10), softcap=2.0,
              alibi_slopes=rng.uniform(0, 1, (2, 4)).astype(np.float32))
    O, L, rounding = run(backend, q, k, v, **kw)
    assert_attention_close(O, L, q, k, v, **kw, **rounding)


@pytest.mark.gpu
def test_cuda_takes_cupy_slopes_and_plans_the_mask_variants(rng, cp):
    q, k, v = (cp.asarray(x) for x in inputs(rng, (2, 4), 50, 90, 64, dtype=np.float16))
    slopes = cp.asarray(rng.uniform(0, 1, 4).astype(np.float32))
    assert plan_for(q, k, v).mask == 0 and plan_for(q, k, v, window=(8, 8)).mask == 1
    assert plan_for(q, k, v, softcap=3.0).mask == 2 and plan_for(q, k, v, alibi_slopes=slopes).mask == 2
    O, L = flash_attention(q, k, v, alibi_slopes=slopes, window=(8, 8), return_lse=True)
    host = [cp.asnumpy(x) for x in (q, k, v)]
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *host, window=(8, 8),
                           alibi_slopes=np.broadcast_to(cp.asnumpy(slopes), (2, 4)),
                           **kernel_rounding(plan_for(q, k, v, alibi_slopes=slopes)))
