"""Values: NaN and ±inf inside q, k or v, scores of ±1e4, fully masked rows, bitwise repeatability.
Each test runs on the C twin and (marked gpu) on whichever CUDA kernel the planner picks for each
dtype, through flash_attention only."""
import numpy as np
import pytest

from backends import BACKEND_DTYPES, np_dtype, run
from cases import inputs
from flashattn_cupy import reference
from nonfinite import assert_nonfinite_like_reference
from tolerances import assert_attention_close

# (array, lead index, row, column): rows and keys on both sides of the tile edges at 32 and 64,
# causal rows 0-9 of Nq = 50, Nk = 40 see no key, and key 37 is seen by rows 47-49 only
PLANTS = {
    "q": [(0, 3, 2), (0, 25, 2), (1, 49, 0)],
    "k": [(0, 5, 2), (0, 37, 2), (1, 39, 15)],
    "v": [(0, 5, 2), (0, 37, 2), (1, 39, 15)],
}
# -NaN with every payload bit set (0xffffffff): a rounding that adds to the bits wraps it to 0
# unless the NaN is kept another way (3xTF32's split, csrc/fa_mma.cuh make_operand)
NAN_ALL_BITS = np.array(0xFFFFFFFF, dtype=np.uint32).view(np.float32)[()]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [np.nan, NAN_ALL_BITS, np.inf, -np.inf], ids=["nan", "nan-bits", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs_behave_as_the_reference(rng, backend, dtype, causal, value, where):
    clean = inputs(rng, (2,), 50, 40, 16, dtype=np_dtype(dtype))
    planted = dict(zip("qkv", (x.copy() for x in clean)))
    for index in PLANTS[where]:
        planted[where][index] = value
    q, k, v = planted["q"], planted["k"], planted["v"]
    O, L, rounding = run(backend, q, k, v, causal=causal)
    assert_nonfinite_like_reference(O, L, q, k, v, causal=causal, **rounding)

    # What the planted values cannot reach (the reference's outputs do not move) is, bit for
    # bit, what a run on the clean inputs gives: they touch nothing else.
    O_ref, L_ref = reference.attention(q, k, v, causal=causal)
    O_ref0, L_ref0 = reference.attention(*clean, causal=causal)
    O0, L0, _ = run(backend, *clean, causal=causal)
    untouched_O, untouched_L = O_ref == O_ref0, L_ref == L_ref0
    assert O[untouched_O].tobytes() == O0[untouched_O].tobytes()
    assert L[untouched_L].tobytes() == L0[untouched_L].tobytes()


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("sign", [1, -1])
def test_scores_of_1e4_do_not_overflow(rng, backend, dtype, sign):
    """s_ij = ±1e4 + δ_ij with δ of a few units: e^s overflows (or underflows) every float type,
    so only the running max keeps the sums finite; O and L must still match the reference, and
    L ≈ ±1e4. Causal with Nq > Nk: the first rows see no key."""
    q, k, v = (np.asarray(x, np.float64) for x in inputs(rng, (2,), 70, 60, 8))
    q[..., 0], k[..., 0] = 100.0, sign * 100.0     # exact in every dtype: 100 * 100 = 1e4
    q, k, v = (x.astype(np_dtype(dtype)) for x in (q, k, v))
    for causal in (False, True):
        O, L, rounding = run(backend, q, k, v, causal=causal, softmax_scale=1.0)
        assert_attention_close(O, L, q, k, v, causal=causal, softmax_scale=1.0, **rounding)
        seen = np.isfinite(L)
        assert np.abs(L[seen] - sign * 1e4).max() < 50


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_repeated_runs_are_bitwise_identical(rng, backend, dtype):
    for causal in (False, True):
        q, k, v = inputs(rng, (2, 3), 203, 113, 80, dtype=np_dtype(dtype))
        first = run(backend, q, k, v, causal=causal)[:2]
        for _ in range(2):
            again = run(backend, q, k, v, causal=causal)[:2]
            assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again))
