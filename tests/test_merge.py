"""merge_attention: two attentions over disjoint key sets make the attention over their union,
against the float64 reference with the bound argued in tolerances.merge_bounds."""
import warnings

import numpy as np
import pytest

from cases import inputs
from flashattn_cupy import flash_attention, merge_attention, reference
from tolerances import bounds, merge_bounds

DTYPES = [("float32", "float32"), ("float64", "float64")]   # (input dtype, compute type)


def _part(q, k, v, causal=False):
    """(O, L) on the C twin over these keys, and its bound against the exact attention over them."""
    O, L = flash_attention(q, k, v, causal=causal, return_lse=True, backend="c")
    compute = "float64" if q.dtype == np.float64 else "float32"
    return (O, L), bounds(q, k, v, compute=compute)


def _assert_close(O, L, q, k, v, tol, causal=False):
    O_ref, L_ref = reference.attention(q, k, v, causal=causal)
    assert O.dtype == q.dtype and L.dtype == np.float32 and O.shape == q.shape and L.shape == q.shape[:-1]
    err_O, err_L = float(np.abs(O - O_ref).max()), float(np.abs(L - L_ref).max())
    assert err_O <= tol[0], f"max |O - O_ref| = {err_O:.3e} > bound {tol[0]:.3e}"
    assert err_L <= tol[1], f"max |L - L_ref| = {err_L:.3e} > bound {tol[1]:.3e}"


@pytest.mark.parametrize("dtype, compute", DTYPES)
@pytest.mark.parametrize("Nq, Nk, d, split", [(1, 2, 16, 1), (33, 70, 40, 35), (17, 1023, 64, 1000),
                                              (113, 203, 80, 17), (5, 300, 128, 299)])
def test_split_keys_merge_to_the_full_attention(rng, dtype, compute, Nq, Nk, d, split):
    """Keys split at random into two disjoint sets (attention does not depend on key order)."""
    q, k, v = inputs(rng, (2, 3), Nq, Nk, d, dtype=np.dtype(dtype), magnitude=2.0)
    keys = rng.permutation(Nk)
    a, b = keys[:split], keys[split:]
    (O_a, L_a), tol_a = _part(q, k[..., a, :], v[..., a, :])
    (O_b, L_b), tol_b = _part(q, k[..., b, :], v[..., b, :])
    O, L = merge_attention(O_a, L_a, O_b, L_b)
    tol = merge_bounds(tol_a, tol_b, L_a, L_b, float(np.abs(v).max()), compute=compute, out=dtype)
    _assert_close(O, L, q, k, v, tol)
    O2, L2 = merge_attention(O_b, L_b, O_a, L_a)
    np.testing.assert_array_equal(O, O2)   # commutative, bitwise
    np.testing.assert_array_equal(L, L2)


def test_kv_cache_and_new_keys_merge_to_causal_attention(rng):
    """Decoding: queries see the whole cache (no mask) and the new keys causally (bottom-right
    aligned, so the same mask on the new keys alone): merged, the causal attention over both."""
    q, k, v = inputs(rng, (2, 4), 40, 300, 64)
    (O_a, L_a), tol_a = _part(q, k[..., :260, :], v[..., :260, :])
    (O_b, L_b), tol_b = _part(q, k[..., 260:, :], v[..., 260:, :], causal=True)
    O, L = merge_attention(O_a, L_a, O_b, L_b)
    _assert_close(O, L, q, k, v, merge_bounds(tol_a, tol_b, L_a, L_b, float(np.abs(v).max())), causal=True)


def test_three_parts_in_either_order(rng):
    q, k, v = inputs(rng, (3,), 20, 150, 32)
    parts = [_part(q, k[..., s, :], v[..., s, :]) for s in (slice(0, 40), slice(40, 41), slice(41, 150))]
    vmax = float(np.abs(v).max())
    for first, second, third in ((0, 1, 2), (1, 2, 0)):   # (p0 + p1) + p2 and (p1 + p2) + p0
        (O_x, L_x), tol_x = parts[first]
        (O_y, L_y), tol_y = parts[second]
        inner = merge_attention(O_x, L_x, O_y, L_y)
        tol_inner = merge_bounds(tol_x, tol_y, L_x, L_y, vmax)
        (O_z, L_z), tol_z = parts[third]
        O, L = merge_attention(*inner, O_z, L_z)
        _assert_close(O, L, q, k, v, merge_bounds(tol_inner, tol_z, inner[1], L_z, vmax))


def test_a_side_with_no_keys_gives_the_other_exactly(rng):
    """L = -inf (O = 0) on one side, row by row: the other side's O and L, bitwise; both sides:
    O = 0 and L = -inf, without NaN or a floating-point warning."""
    O_a, O_b = (rng.standard_normal((2, 6, 8)).astype(np.float32) for _ in range(2))
    L_a, L_b = (rng.standard_normal((2, 6)).astype(np.float32) * 10 for _ in range(2))
    L_a[:, 0], L_b[:, 1] = -np.inf, -np.inf            # row 0: only b; row 1: only a
    L_a[:, 2] = L_b[:, 2] = -np.inf                    # row 2: neither
    O_a[np.isneginf(L_a)] = 0
    O_b[np.isneginf(L_b)] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        O, L = merge_attention(O_a, L_a, O_b, L_b)
    np.testing.assert_array_equal(O[:, 0], O_b[:, 0])
    np.testing.assert_array_equal(L[:, 0], L_b[:, 0])
    np.testing.assert_array_equal(O[:, 1], O_a[:, 1])
    np.testing.assert_array_equal(L[:, 1], L_a[:, 1])
    assert (O[:, 2] == 0).all() and np.isneginf(L[:, 2]).all()
    assert np.isfinite(O).all() and np.isfinite(L[:, 3:]).all()


def test_a_part_merged_with_itself(rng):
    """The same keys twice: O unchanged (the weights are 1/2 each, exactly), L + log 2; the rows
    that causal attention with more queries than keys leaves without a key stay O = 0, L = -inf."""
    q, k, v = inputs(rng, (2,), 50, 20, 16)
    O_a, L_a = flash_attention(q, k, v, causal=True, return_lse=True)
    O, L = merge_attention(O_a, L_a, O_a, L_a)
    np.testing.assert_array_equal(O, O_a)
    assert np.isneginf(L[:, :30]).all() and (O[:, :30] == 0).all()
    err = np.abs(L[:, 30:].astype(np.float64) - (L_a[:, 30:] + np.log(2.0))).max()
    assert err <= 2.0**-23 * (1 + np.abs(L_a[:, 30:]).max())   # log(2) and the sum, rounded


def test_nan_stays_nan():
    O = np.zeros((1, 2, 4), np.float32)
    L = np.array([[np.nan, 0.0]], np.float32)
    O_m, L_m = merge_attention(O, L, O, np.zeros_like(L))
    assert np.isnan(L_m[0, 0]) and np.isnan(O_m[0, 0]).all() and L_m[0, 1] == np.float32(np.log(2))


def test_half_precision_outputs_keep_their_dtype():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dtype in (np.float16, ml_dtypes.bfloat16):
        O = np.ones((3, 4), dtype)
        O_m, L_m = merge_attention(O, np.zeros(3, np.float32), 2 * O, np.zeros(3, np.float32))
        assert O_m.dtype == dtype and L_m.dtype == np.float32
        np.testing.assert_array_equal(O_m.astype(np.float32), 1.5)


@pytest.mark.parametrize("change, exc, words", [
    (dict(O_b=np.zeros((2, 5, 8), np.float32)), ValueError, "O_a and O_b of one shape"),
    (dict(L_a=np.zeros((2, 5), np.float32)), ValueError, "L_a, L_b of shape (..., Nq)"),
    (dict(O_a=np.zeros(8, np.float32), O_b=np.zeros(8, np.float32), L_a=np.zeros((), np.float32),
          L_b=np.zeros((), np.float32)), ValueError, "(..., Nq, d)"),
    (dict(O_b=np.zeros((2, 6, 8), np.float64)), TypeError, "O_a and O_b must have one float dtype"),
    (dict(O_a=np.zeros((2, 6, 8), np.int32), O_b=np.zeros((2, 6, 8), np.int32)), TypeError, "one float dtype"),
    (dict(L_b=np.zeros((2, 6), np.float16)), TypeError, "L_a and L_b must be float32"),
    (dict(L_a=np.zeros((2, 6)).tolist()), TypeError, "all NumPy or all CuPy arrays"),
])
def test_errors(change, exc, words):
    args = dict(O_a=np.zeros((2, 6, 8), np.float32), L_a=np.zeros((2, 6), np.float32),
                O_b=np.zeros((2, 6, 8), np.float32), L_b=np.zeros((2, 6), np.float32))
    args.update(change)
    with pytest.raises(exc) as info:
        merge_attention(**args)
    assert words in str(info.value)


@pytest.mark.gpu
def test_cupy_arrays(rng, cp):
    """On CuPy arrays: CuPy out, within the merge's bound of the reference and of the NumPy merge."""
    q, k, v = inputs(rng, (2, 4), 64, 500, 64)
    (O_a, L_a), tol_a = _part(q, k[..., :123, :], v[..., :123, :])
    (O_b, L_b), tol_b = _part(q, k[..., 123:, :], v[..., 123:, :])
    L_a[0, 0, :5] = L_b[0, 1, 5:9] = -np.inf      # rows with no key on one side, or both
    L_b[0, 0, :3] = -np.inf
    O_a[np.isneginf(L_a)] = O_b[np.isneginf(L_b)] = 0
    O, L = merge_attention(*(cp.asarray(x) for x in (O_a, L_a, O_b, L_b)))
    assert isinstance(O, cp.ndarray) and isinstance(L, cp.ndarray) and O.dtype == np.float32
    O_np, L_np = merge_attention(O_a, L_a, O_b, L_b)
    O, L = cp.asnumpy(O), cp.asnumpy(L)
    np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_np))
    assert (O[np.isneginf(L)] == 0).all() and not np.isnan(O).any()
    finite = np.isfinite(L_np)
    tol_O, tol_L = merge_bounds((0, 0), (0, 0), L_a, L_b, float(np.abs(v).max()))
    assert np.abs(O - O_np).max() <= 2 * tol_O and np.abs(L - L_np)[finite].max() <= 2 * tol_L
    rows = np.isfinite(L_a) & np.isfinite(L_b)   # these rows see every key: the full attention
    O_ref, L_ref = reference.attention(q, k, v)
    tol = merge_bounds(tol_a, tol_b, L_a, L_b, float(np.abs(v).max()))
    assert np.abs(O - O_ref)[rows].max() <= tol[0] and np.abs(L - L_ref)[rows].max() <= tol[1]
