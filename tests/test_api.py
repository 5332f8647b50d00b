"""The public API: types, shapes, backend choice, and every validation error."""
import numpy as np
import pytest

import flashattn_cupy
from cases import inputs
from flashattn_cupy import _device, api, flash_attention, plan_for, planner
from tolerances import assert_attention_close


def test_returns_o_or_o_and_l(rng):
    q, k, v = inputs(rng, (2, 3), 5, 7, 8)
    O = flash_attention(q, k, v)
    assert isinstance(O, np.ndarray) and O.shape == q.shape and O.dtype == np.float32
    O2, L = flash_attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(O, O2)
    assert L.shape == (2, 3, 5) and L.dtype == np.float32


def test_default_scale_is_one_over_sqrt_d(rng):
    q, k, v = inputs(rng, (), 9, 11, 16)
    np.testing.assert_array_equal(flash_attention(q, k, v), flash_attention(q, k, v, softmax_scale=0.25))


def test_reference_backend(rng):
    q, k, v = inputs(rng, (2,), 9, 11, 16)
    O, L = flash_attention(q, k, v, return_lse=True, backend="reference", causal=True)
    assert O.dtype == np.float32 and L.dtype == np.float32
    assert_attention_close(O, L, q, k, v, causal=True)


def test_reference_backend_takes_bfloat16(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = inputs(rng, (2,), 9, 11, 16, dtype=ml_dtypes.bfloat16)
    O = flash_attention(q, k, v, backend="reference")
    assert O.dtype == ml_dtypes.bfloat16


def test_non_contiguous_and_read_only_inputs(rng):
    q, k, v = inputs(rng, (3, 2), 40, 50, 24)
    qt, kt, vt = (np.swapaxes(x, 0, 1) for x in (q, k, v))     # (2, 3, N, d) views
    kr = kt[:, :, ::-1]                                         # negative stride
    vr = vt[:, :, ::-1].copy()
    vr.flags.writeable = False
    O, L = flash_attention(qt, kr, vr, return_lse=True)
    assert_attention_close(O, L, qt, kr, vr)


def test_inputs_are_not_modified(rng):
    q, k, v = inputs(rng, (2,), 33, 17, 20)
    before = [x.copy() for x in (q, k, v)]
    flash_attention(q, k, v, causal=True)
    for x, y in zip((q, k, v), before):
        assert x.tobytes() == y.tobytes()


def test_plan_for(rng):
    q, k, v = inputs(rng, (2,), 256, 256, 64)
    plan = plan_for(q, k, v)
    assert (plan.backend, plan.Br, plan.Bc) == ("c", 128, 64)
    assert "Br=128, Bc=64" in str(plan) and "1 thread" in str(plan)
    assert plan_for(q, k, v, num_threads=4).threads == 2   # one thread per head at most
    assert plan_for(q, k, v, backend="reference") is None


def _bad(rng):
    return inputs(rng, (2,), 8, 8, 16)


@pytest.mark.parametrize("make, exc, words", [
    (lambda q, k, v: dict(q=q.tolist()), TypeError, "q must be a NumPy or CuPy array"),
    (lambda q, k, v: dict(k=q[0, 0]), ValueError, "k must have shape (..., N, d) with at least 2 dims"),
    (lambda q, k, v: dict(k=k[:1]), ValueError, "same leading (batch, heads) dims"),
    (lambda q, k, v: dict(v=v[:, :5]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: dict(q=q[..., :8]), ValueError, "same head dim"),
    (lambda q, k, v: dict(q=q[:, :0]), ValueError, "q has an empty dimension"),
    (lambda q, k, v: dict(q=q[..., :0], k=k[..., :0], v=v[..., :0]), ValueError, "empty dimension"),
    (lambda q, k, v: dict(q=np.zeros((2, 8, 300), np.float32), k=np.zeros((2, 8, 300), np.float32),
                          v=np.zeros((2, 8, 300), np.float32)), ValueError, "at most 256"),
    (lambda q, k, v: dict(v=v.astype(np.float64)), TypeError, "same dtype"),
    (lambda q, k, v: dict(q=q.astype(np.int32), k=k.astype(np.int32), v=v.astype(np.int32)),
     TypeError, "float32 or float64, got int32"),
    (lambda q, k, v: dict(q=q.astype(np.complex64), k=k.astype(np.complex64), v=v.astype(np.complex64)),
     TypeError, "got complex64"),
    (lambda q, k, v: dict(q=q.astype(np.float16), k=k.astype(np.float16), v=v.astype(np.float16)),
     TypeError, "backend='cuda' for float16"),
    (lambda q, k, v: dict(backend="gpu"), ValueError, "backend must be one of"),
    (lambda q, k, v: dict(causal="yes"), TypeError, "causal must be True or False"),
    (lambda q, k, v: dict(return_lse=1), TypeError, "return_lse must be True or False"),
    (lambda q, k, v: dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite"),
    (lambda q, k, v: dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be a finite"),
    (lambda q, k, v: dict(softmax_scale=1e300), ValueError, "softmax_scale must be a finite"),
    (lambda q, k, v: dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a real number"),
    (lambda q, k, v: dict(softmax_scale=True), TypeError, "softmax_scale must be a real number"),
    (lambda q, k, v: dict(num_threads=0), ValueError, "num_threads must be a positive int, got 0"),
    (lambda q, k, v: dict(num_threads=2.0), TypeError, "num_threads must be a positive int, got 2.0"),
    (lambda q, k, v: dict(num_threads=True), TypeError, "num_threads must be a positive int"),
    (lambda q, k, v: dict(num_threads=None), TypeError, "num_threads must be a positive int"),
    (lambda q, k, v: dict(num_threads=2, backend="reference"), ValueError,
     "num_threads applies to the C backend only"),
    (lambda q, k, v: dict(num_threads=2, backend="cuda"), ValueError,   # before CuPy is needed
     "num_threads applies to the C backend only; this call runs on the 'cuda' backend"),
])
def test_validation_errors(rng, make, exc, words):
    q, k, v = _bad(rng)
    args = dict(q=q, k=k, v=v)
    args.update(make(q, k, v))
    before = [np.asarray(x).tobytes() if isinstance(x, np.ndarray) else None for x in args.values()]
    extra = {key: args.pop(key) for key in list(args) if key not in ("q", "k", "v")}
    with pytest.raises(exc) as info:
        flash_attention(args["q"], args["k"], args["v"], **extra)
    assert words in str(info.value)
    after = [np.asarray(x).tobytes() if isinstance(x, np.ndarray) else None for x in (args["q"], args["k"], args["v"])]
    assert before[:3] == after


def test_unknown_keyword_is_a_type_error(rng):
    with pytest.raises(TypeError):
        flash_attention(*_bad(rng), dropout_p=0.1)


def test_cuda_without_gpu_says_how_to_install(rng, monkeypatch):
    monkeypatch.setattr(_device, "_probe", lambda: (None, "CuPy is not importable; " + _device.INSTALL_HINT))
    with pytest.raises(flashattn_cupy.BackendUnavailableError) as info:
        flash_attention(*_bad(rng), backend="cuda")
    assert isinstance(info.value, ValueError)
    assert "flashattn_cupy[cuda12]" in str(info.value) and "flashattn_cupy[cuda13]" in str(info.value)


@pytest.mark.gpu
def test_numpy_mixed_with_cupy_is_refused(rng, cp):
    q, k, v = _bad(rng)
    with pytest.raises(TypeError, match="must all be NumPy arrays or all CuPy arrays"):
        flash_attention(cp.asarray(q), k, v)


@pytest.mark.gpu
def test_num_threads_on_cupy_arrays(rng, cp):
    q, k, v = (cp.asarray(x) for x in inputs(rng, (3,), 40, 50, 24))
    with pytest.raises(ValueError, match="C backend only"):
        flash_attention(q, k, v, num_threads=2)   # auto: CuPy arrays run on "cuda"
    O = flash_attention(q, k, v, backend="c", num_threads=2)
    cp.testing.assert_array_equal(O, flash_attention(q, k, v, backend="c"))


class _StandIn:
    """Enough of a cupy.ndarray for api._call_key: shape, strides, dtype, data.device_id."""

    def __init__(self, shape, strides=None, dtype=np.float16, device=0):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.strides = strides or tuple(int(s) for s in np.empty(shape, dtype).strides)
        self.data = type("MemoryPointer", (), {"device_id": device})()


def _options(causal=False, softmax_scale=None, window=None, softcap=0.0, alibi_slopes=None, backend="auto",
             num_threads=1, allow_tf32=False, fp32_kernel="auto"):
    """flash_attention's keywords in the order api passes them to _call_key, its defaults."""
    return (causal, softmax_scale, window, softcap, alibi_slopes, backend, num_threads, allow_tf32, fp32_kernel)


def test_the_key_of_kept_calls_holds_what_validation_reads(monkeypatch):
    """On a stand-in for cupy.ndarray (tests/test_call_reuse.py runs kept calls on a GPU): equal calls share
    a key, and anything validation or planning reads tells calls apart, down to the options'
    types; calls whose key would hide what validation reads are not kept (None)."""
    monkeypatch.setattr(_device, "ndarray_type", lambda: _StandIn)
    q, k = _StandIn((2, 3, 64, 32)), _StandIn((2, 3, 96, 32))
    key = lambda *arrays, lse=False, **kw: api._call_key(*arrays, _options(**kw), lse)  # noqa: E731
    base = key(q, k, k)
    assert base is not None and base == key(_StandIn((2, 3, 64, 32)), k, k) and hash(base) == hash(key(q, k, k))
    assert key(q, k, k, lse=True) == base                                    # only picks what is returned
    others = [key(q, k, k, causal=True), key(q, k, k, causal=1), key(q, k, k, softmax_scale=0.5),
              key(q, k, k, softmax_scale=np.float32(0.5)), key(q, k, k, window=(8, 0)), key(q, k, k, softcap=2.0),
              key(q, k, k, backend="cuda"), key(q, k, k, allow_tf32=True), key(q, k, k, fp32_kernel="simt"),
              key(_StandIn((2, 3, 64, 32), dtype=np.float32), k, k), key(_StandIn((2, 3, 64, 32), device=1), k, k),
              key(_StandIn((2, 3, 64, 32), strides=(2 * 64 * 3 * 32, 2 * 32, 2 * 3 * 32, 2)), k, k),
              key(q, k, _StandIn((2, 1, 96, 32)))]
    assert len({base, *others}) == len(others) + 1
    with planner.wgmma_default(not planner.WGMMA_BY_DEFAULT):
        assert key(q, k, k) != base
    for window in ((True, 0), (8.0, 0), [8, 0], (np.int64(8), 0)):         # equal to (8, 0) or (1, 0) by value
        assert key(q, k, k, window=window) is None
    assert key(q, k, k, alibi_slopes=np.ones(3, np.float32)) is None
    assert key(q, k, k, lse=np.True_) is None and key(q, k, k, lse=1) is None
    assert key(np.zeros((2, 3, 64, 32), np.float16), k, k) is None


def test_a_call_kept_for_other_keys_is_used_only_where_validation_would_pass(monkeypatch):
    """api._for_keys on _call_key-shaped keys (CPU: a stand-in for the kept Call): it re-makes the
    call kept for the same key less k's and v's Nk, and leaves to validation an Nk of 0, one of
    2**31, and k and v of different lengths."""
    made = []

    class Kept:
        def for_keys(self, q, k, v, Nk, window, plan_of):
            made.append((Nk, window, plan_of))
            return "call"

    def key(Nk, Nk_v=None, Nq=1, window=None):   # as _call_key builds it: shapes at 0, 4 and 8
        options = (True, None, window, 0.0, None, "auto", 1, False, "auto")
        return ((2, 8, Nq, 64), (1,), "f2", 0, (2, 2, Nk, 64), (2,), "f2", 0, (2, 2, Nk_v or Nk, 64), (2,),
                "f2", 0, options, tuple(map(type, options)), True, True)
    monkeypatch.setattr(api, "_GROWING", {api._growing_key(key(100)): Kept()})
    assert api._growing_key(key(100)) == api._growing_key(key(5000)) != api._growing_key(key(100, Nq=2))
    assert api._for_keys(key(101), "q", "k", "v", (8, 0)) == "call"
    assert made == [(101, (8, 0), api._plan)]
    for refused in (key(0), key(2**31), key(101, 102), key(101, Nq=2)):
        assert api._for_keys(refused, "q", "k", "v", None) is None
    assert len(made) == 1
