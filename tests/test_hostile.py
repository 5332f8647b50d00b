"""Hostile inputs: a wrong call is a TypeError or ValueError whose message names the argument,
raised before any kernel runs, and the caller's arrays are unchanged, bit for bit; awkward but
valid arrays (views, read-only, broadcast, unaligned, aliased) give the right answer and are
unchanged too. test_api.py::test_validation_errors has the first cases (lists, ndim 1, leading
dims, k/v shapes, head dims, empty q, d = 300, int32, complex, float16 on C, backend "gpu", flag
types, NaN/inf/1e300 scale); these are the rest, with NumPy and (marked gpu) CuPy arrays."""
import re
from decimal import Decimal

import ml_dtypes
import numpy as np
import pytest

from cases import inputs
from flashattn_cupy import _c_backend, _cuda_backend, _device, flash_attention, plan_for, reference
from tolerances import assert_attention_close, kernel_rounding

KINDS = [pytest.param("numpy"), pytest.param("cupy", marks=pytest.mark.gpu)]


def _huge(xp, x, shape):
    """A zero-stride view of x's first element row with this shape: no memory behind it."""
    return xp.broadcast_to(x[:1, :1], shape)


def _as(xp, dtype):
    return lambda q, k, v: ((q.astype(dtype), k.astype(dtype), v.astype(dtype)), {})


def _kw(**kw):
    return lambda q, k, v: ((q, k, v), kw)


# (id, builder (q, k, v) -> (args, kwargs), exception, the names the message must contain, words
# it must contain); q, k, v of shape (2, 8, 16), float32, arrays of the module xp
def _cases(xp):
    return [
        ("q 0-d", lambda q, k, v: ((xp.asarray(1.0, dtype=q.dtype), k, v), {}), ValueError, "q", "at least 2 dims"),
        ("q a NumPy scalar", lambda q, k, v: ((np.float32(1.0), k, v), {}), TypeError, "q", "NumPy or CuPy array"),
        ("k a float", lambda q, k, v: ((q, 1.0, v), {}), TypeError, "k", "NumPy or CuPy array"),
        ("Nk = 0", lambda q, k, v: ((q, k[..., :0, :], v[..., :0, :]), {}), ValueError, "k", "empty dimension"),
        ("k with an extra leading dim", lambda q, k, v: ((q, k[None], v[None]), {}), ValueError, "q k v",
         "same leading (batch, heads) dims"),
        ("v's head dim", lambda q, k, v: ((q, k, v[..., :8]), {}), ValueError, "k v", "same shape"),
        ("d = 257", lambda q, k, v: ((xp.zeros((2, 8, 257), q.dtype),) * 3, {}), ValueError, "q k v", "at most 256"),
        ("bool", _as(xp, bool), TypeError, "q k v", "got bool"),
        ("uint8", _as(xp, xp.uint8), TypeError, "q k v", "got uint8"),
        ("float64 on cuda", lambda q, k, v: ((q.astype(xp.float64), k.astype(xp.float64), v.astype(xp.float64)),
                                             dict(backend="cuda")), TypeError, "q k v", "got float64"),
        ("Nq = 2**31", lambda q, k, v: ((_huge(xp, q, (2, 2**31, 16)), k, v), {}), ValueError, "q k",
         "below 2**31"),
        ("heads = 2**31", lambda q, k, v: (tuple(_huge(xp, x, (2**31, 1, 16)) for x in (q, k, v)), {}),
         ValueError, "q k v", "heads"),
        ("batch = 2**31", lambda q, k, v: (tuple(_huge(xp, x, (2**16, 2**15, 1, 1, 16)) for x in (q, k, v)), {}),
         ValueError, "q k v", "batch"),
        ("scale 10**400", _kw(softmax_scale=10**400), ValueError, "softmax_scale", "finite float32"),
        ("scale -1e39", _kw(softmax_scale=-1e39), ValueError, "softmax_scale", "finite float32"),
        ("scale float32 inf", _kw(softmax_scale=np.float32("inf")), ValueError, "softmax_scale", "finite float32"),
        ("scale float64 nan", _kw(softmax_scale=np.float64("nan")), ValueError, "softmax_scale", "finite float32"),
        ("scale complex", _kw(softmax_scale=0.5 + 0j), TypeError, "softmax_scale", "real number"),
        ("scale Decimal", _kw(softmax_scale=Decimal("0.5")), TypeError, "softmax_scale", "real number"),
        ("scale 0-d array", _kw(softmax_scale=np.array(0.5)), TypeError, "softmax_scale", "real number"),
        ("backend None", _kw(backend=None), ValueError, "backend", "must be one of"),
        ("backend 'C'", _kw(backend="C"), ValueError, "backend", "must be one of"),
        ("causal None", _kw(causal=None), TypeError, "causal", "True or False"),
        ("causal 0-d array", _kw(causal=np.array(True)), TypeError, "causal", "True or False"),
        ("return_lse 'no'", _kw(return_lse="no"), TypeError, "return_lse", "True or False"),
        ("keyword scale", _kw(scale=0.1), TypeError, "scale", "unexpected keyword"),
        ("keyword window_size", _kw(window_size=(-1, -1)), TypeError, "window_size", "unexpected keyword"),
        ("a 4th positional", lambda q, k, v: ((q, k, v, True), {}), TypeError, "", "positional"),
    ]


NUMPY_ONLY = [   # arrays CuPy has no counterpart for
    ("object", _as(np, object), TypeError, "q k v", "got object"),
    ("bfloat16 on c", _as(np, ml_dtypes.bfloat16), TypeError, "q k v", "got bfloat16"),
    ("masked q", lambda q, k, v: ((np.ma.masked_array(q, mask=q > 1), k, v), {}), TypeError, "q", "mask"),
    ("big-endian k", lambda q, k, v: ((q, k.astype(">f4"), v), {}), TypeError, "k", "byte order"),
]


@pytest.fixture
def no_kernels(monkeypatch):
    """Any backend that starts to compute fails the test: errors must come first."""
    def ran(*args, **kwargs):
        raise AssertionError("a backend ran before the argument error")
    for module in (_c_backend, _cuda_backend):
        monkeypatch.setattr(module, "run", ran)
    monkeypatch.setattr(_cuda_backend, "run_call", ran)
    monkeypatch.setattr(reference, "attention", ran)


def _snapshot(arrays):
    """Bytes of every array small enough to copy (views of the base arrays are covered by them)."""
    cp = _device.cupy() if any(_device.is_cupy_array(x) for x in arrays) else None
    return [(cp.asnumpy(x) if _device.is_cupy_array(x) else np.asarray(x)).tobytes()
            if hasattr(x, "nbytes") and x.size <= 2**20 else None for x in arrays]


def _refused(build, exc, names, words, q, k, v):
    args, kwargs = build(q, k, v)
    arrays = [q, k, v, *args]
    before = _snapshot(arrays)
    with pytest.raises(exc) as info:
        flash_attention(*args, **kwargs)
    message = str(info.value)
    assert words in message
    for name in names.split():
        assert re.search(rf"(?<![\w.']){re.escape(name)}\b", message) or f"'{name}'" in message, \
            f"the message does not name {name!r}: {message}"
    assert _snapshot(arrays) == before


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(_cases(np))), ids=[c[0] for c in _cases(np)])
def test_refused_before_any_kernel(rng, kind, case):
    xp = np if kind == "numpy" else _device.cupy()
    _, build, exc, names, words = _cases(xp)[case]
    q, k, v = (xp.asarray(x) for x in inputs(rng, (2,), 8, 8, 16))
    _refused(build, exc, names, words, q, k, v)


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("name, build, exc, names, words", NUMPY_ONLY, ids=[c[0] for c in NUMPY_ONLY])
def test_refused_numpy_only(rng, name, build, exc, names, words):
    _refused(build, exc, names, words, *inputs(rng, (2,), 8, 8, 16))


@pytest.mark.gpu
@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("cupy_args", ["q", "k v"])
def test_numpy_mixed_with_cupy(rng, cp, cupy_args):
    def build(q, k, v):
        return tuple(cp.asarray(x) if n in cupy_args else x for n, x in zip("qkv", (q, k, v))), {}
    _refused(build, TypeError, "q k v", "must all be NumPy arrays or all CuPy arrays", *inputs(rng, (2,), 8, 8, 16))


@pytest.mark.gpu
@pytest.mark.usefixtures("no_kernels")
def test_arrays_on_two_gpus(rng, cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU: arrays on two GPUs need two")
    q, k, v = inputs(rng, (2,), 8, 8, 16)
    with cp.cuda.Device(0):
        q, k = cp.asarray(q), cp.asarray(k)
    with cp.cuda.Device(1):
        v = cp.asarray(v)
    _refused(lambda q, k, v: ((q, k, v), {}), ValueError, "q k v", "different GPUs", q, k, v)


# Valid but awkward, from contiguous (B, N, H, d) arrays: (B, H, N, d) views of them, and more
LAYOUTS = {
    "transposed views": lambda xp, q, k, v: (q, k, v),
    "negative strides": lambda xp, q, k, v: tuple(x[:, :, ::-1, ::-1] for x in (q, k, v)),
    "broadcast k, v": lambda xp, q, k, v: (q, *(xp.broadcast_to(x[:, :1], x.shape) for x in (k, v))),
    "Fortran order": lambda xp, q, k, v: tuple(xp.asfortranarray(x) for x in (q, k, v)),
    "one array for all three": lambda xp, q, k, v: (k, k, k),
    "read-only": lambda xp, q, k, v: tuple(_read_only(x) for x in (q, k, v)),
}


def _read_only(x):
    if isinstance(x, np.ndarray):
        x = x.view()
        x.flags.writeable = False
    return x   # CuPy arrays are never read-only


def _host(x):
    return x if isinstance(x, np.ndarray) else _device.cupy().asnumpy(x)


@pytest.mark.parametrize("backend", ["c", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_awkward_arrays_are_read_right_and_left_alone(rng, kind, layout, backend):
    xp = np if kind == "numpy" else _device.cupy()
    bnhd = [xp.asarray(rng.standard_normal((2, N, 3, 24), dtype=np.float32)) for N in (60, 50, 50)]
    q, k, v = LAYOUTS[layout](xp, *(x.swapaxes(1, 2) for x in bnhd))
    before = _snapshot([*bnhd, q, k, v])
    for causal in (False, True):
        O, L = flash_attention(q, k, v, causal=causal, return_lse=True, backend=backend)
        rounding = {} if backend == "c" else kernel_rounding(plan_for(q, k, v, causal=causal, backend="cuda"))
        assert_attention_close(_host(O), _host(L), *map(_host, (q, k, v)), causal=causal, **rounding)
    assert _snapshot([*bnhd, q, k, v]) == before


def _unaligned(x):
    """A copy of x whose data starts one byte past an aligned address."""
    buf = np.zeros(x.nbytes + 1, np.uint8)
    y = np.frombuffer(buf.data, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
    y[...] = x
    assert not y.flags.aligned
    return y


def test_unaligned_numpy_arrays(rng):
    q, k, v = inputs(rng, (2,), 37, 29, 24)
    qu, ku, vu = (_unaligned(x) for x in (q, k, v))
    O, L = flash_attention(qu, ku, vu, causal=True, return_lse=True)
    assert_attention_close(O, L, q, k, v, causal=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip((q, k, v), (qu, ku, vu)))
