"""Argument checking and normalization. Every user error is raised here, before any kernel
runs, as a TypeError or ValueError that names the argument and says what was expected."""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _device
from .planner import MAX_HEAD_DIM

BACKENDS = ("auto", "c", "cuda", "reference")
FP32_KERNELS = ("auto", "3xtf32", "simt")
BACKEND_DTYPES = {
    "c": ("float32", "float64"),
    "cuda": ("float32", "float16", "bfloat16"),
    "reference": ("float32", "float64", "float16", "bfloat16"),
}
_DTYPE_ADVICE = {
    "c": "cast with .astype(numpy.float32), or use backend='cuda' for float16/bfloat16",
    "cuda": "cast with .astype(float32), or use backend='c' for float64",
    "reference": "cast to a floating dtype",
}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = 2**31 - 1
_DTYPES: dict = {}   # an array's dtype -> (numpy.dtype, its name): numpy's .name costs microseconds


def _dtype(x) -> tuple[np.dtype, str]:
    """(numpy.dtype, name) of an array's dtype, looked up once per dtype object (a call's
    validation reads three; the small-call figure of the benchmark counts each microsecond)."""
    found = _DTYPES.get(x.dtype)
    if found is None:
        dt = np.dtype(x.dtype)
        found = _DTYPES[x.dtype] = (dt, dt.name)
    return found


@dataclass(frozen=True)
class Problem:
    """A validated call: what to compute, where, and what array type to hand back."""

    q: Any          # NumPy or CuPy arrays
    k: Any
    v: Any
    backend: str        # "c", "cuda" or "reference"
    on_gpu: bool        # the caller passed CuPy arrays (and gets CuPy arrays back)
    dtype: str
    lead: tuple         # q's leading (batch..., heads) dims; k and v share all but heads
    Nq: int
    Nk: int
    d: int
    scale: float
    causal: bool
    num_threads: int = 1  # C backend: Python threads to share the batch * heads problems
    fp32: str = "auto"  # float32 on CUDA: "auto", "3xtf32", "simt" or "tf32" (planner.plan's fp32)
    group: int = 1      # q heads per k/v head (GQA/MQA when > 1): q head h reads k/v head h // group
    # The keys each row sees, (left, right) with -1 unbounded, causal folded in (csrc/fa_mask.cuh);
    # None: from causal alone
    window: tuple | None = None
    softcap: float = 0.0    # 0: off; else the float32 value the kernels use
    alibi: Any = None       # float32 slopes of shape lead, contiguous, where the backend reads them

    def __post_init__(self):
        if self.window is None:
            object.__setattr__(self, "window", (-1, 0) if self.causal else (-1, -1))

    @property
    def heads(self) -> int:
        return kernel_dims(self.lead, self.group)[1]

    @property
    def batch(self) -> int:
        return kernel_dims(self.lead, self.group)[0]


def kernel_dims(lead: tuple, group: int) -> tuple[int, int]:
    """(batch, heads) as the kernels count them: heads, q's last leading dim (with GQA each k/v
    head serves `group` consecutive ones); batch, every other leading dim, flattened."""
    heads = lead[-1] if lead else 1
    return math.prod(lead) // heads, heads


def _array_kind(name: str, x) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    if _device.is_cupy_array(x):
        return "cupy"
    raise TypeError(f"{name} must be a NumPy or CuPy array of shape (..., N, d) (or a torch/JAX "
                    "array, or any array with __dlpack__ or __cuda_array_interface__), "
                    f"got {type(x).__module__}.{type(x).__qualname__}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _fp32_mode(allow_tf32, fp32_kernel, backend: str, dtype: str) -> str:
    allow_tf32 = _check_flag("allow_tf32", allow_tf32)
    if not isinstance(fp32_kernel, str) or fp32_kernel not in FP32_KERNELS:
        raise ValueError(f"fp32_kernel must be one of {', '.join(map(repr, FP32_KERNELS))}, "
                         f"got {fp32_kernel!r}")
    if (allow_tf32 or fp32_kernel != "auto") and (backend != "cuda" or dtype != "float32"):
        raise ValueError("allow_tf32 and fp32_kernel choose how float32 runs on the CUDA backend; "
                         f"this call is {dtype} on backend {backend!r}: leave them at their defaults")
    if allow_tf32 and fp32_kernel != "auto":
        raise ValueError(f"allow_tf32=True selects the TF32 kernel; it contradicts "
                         f"fp32_kernel={fp32_kernel!r}: pass one of them")
    return "tf32" if allow_tf32 else fp32_kernel


def window_pair(window, causal: bool, Nq: int, Nk: int) -> tuple[int, int]:
    """The keys each row sees as the kernels take them: (left, right), -1 for an unbounded side
    (csrc/fa_mask.cuh). causal makes right 0; a side that reaches every key from every row
    (left >= Nk - 1, right >= Nq - 1) becomes -1, so an all-seeing window costs no mask."""
    if window is None:
        left, right = -1, -1
    else:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, numbers.Integral) and not isinstance(w, (bool, np.bool_)) for w in window)):
            raise TypeError(f"window must be None or a pair of ints (left, right), -1 for an unbounded "
                            f"side, got {window!r}")
        left, right = (int(w) for w in window)
        for side, w in (("left", left), ("right", right)):
            if w < -1:
                raise ValueError(f"window={tuple(window)!r}: {side} must be >= 0 (keys seen on that side of "
                                 f"the diagonal) or -1 (no limit), got {w}")
    if causal:
        right = 0
    return (-1 if left >= Nk - 1 else left), (-1 if right >= Nq - 1 else right)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _as_float(x) -> float:
    """float(x) for a real number, inf for an int beyond any float."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def check_softcap(softcap) -> float:
    """softcap as the kernels see it: 0.0 (off) or a positive finite float32 value."""
    if not _is_real(softcap):
        raise TypeError(f"softcap must be a real number (0 for none), got {softcap!r}")
    value = _as_float(softcap)
    if value == 0:
        return 0.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"softcap must be 0 (off) or a positive finite number, got {softcap!r}")
    with np.errstate(over="ignore"):
        cap = float(np.float32(value))
    if value > 0 and not (0 < cap <= _FLOAT32_MAX):
        raise ValueError(f"softcap={softcap!r} is {'0' if cap == 0 else 'inf'} in float32, as the kernels take it: "
                         "pass 0 for none, or a value between 1.4e-45 and 3.4e38")
    return cap


def check_alibi(alibi_slopes, lead: tuple, on_gpu: bool, backend: str, device_id: int | None):
    """The ALiBi slopes as the backend reads them: float32, shape lead (one slope per (batch...,
    head)), contiguous; a CuPy array on device_id for "cuda", else NumPy. Takes (heads,) or lead
    shapes, NumPy/CuPy/DLPack arrays or lists; host values must be finite."""
    if alibi_slopes is None:
        return None
    from . import _interop
    x = alibi_slopes
    if _interop._is_foreign(x):
        x = _interop._native("alibi_slopes", x)
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    kind = "numpy" if isinstance(x, np.ndarray) else "cupy" if _device.is_cupy_array(x) else None
    if kind is None:
        raise TypeError(f"alibi_slopes must be None or an array (NumPy, CuPy, torch, ... or a list) of one "
                        f"slope per head, got {type(x).__module__}.{type(x).__qualname__}")
    dtype = np.dtype(x.dtype)
    if dtype.kind not in "fiu" and dtype.name != "bfloat16":
        raise TypeError(f"alibi_slopes must hold real numbers (the kernels read float32), got dtype {dtype}: "
                        "cast with .astype(float32)")
    heads = lead[-1] if lead else 1
    if tuple(x.shape) not in ((heads,), lead):
        raise ValueError(f"alibi_slopes must have shape ({heads},) (one slope per head) or {lead} (one per "
                         f"batch index and head: q.shape[:-2]), got {tuple(x.shape)}")
    if kind == "cupy":
        if not on_gpu:
            raise TypeError("alibi_slopes is a CuPy array and q, k, v are NumPy arrays; pass NumPy slopes "
                            "(or a list), or CuPy q, k, v")
        if x.device.id != device_id:
            raise ValueError(f"alibi_slopes is on GPU {x.device.id} and q, k, v on GPU {device_id}; "
                             "copy the slopes to q's device")
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            host = np.asarray(x).astype(np.float32)
        if not np.isfinite(host).all():
            raise ValueError("alibi_slopes must be finite float32 numbers; got NaN, inf or a value beyond "
                             f"float32's range (max |slope| {np.abs(np.asarray(x, np.float64)).max()!r})")
        x = host
    if tuple(x.shape) == (heads,):   # one slope a head, for every batch index (q with no leading dims: ())
        x = x.reshape((1,) * (len(lead) - 1) + (heads,) if lead else ())
    # copy() where the broadcast is not contiguous (ascontiguousarray would make 0-d 1-d)
    contiguous = lambda y: y if y.flags.c_contiguous else y.copy()  # noqa: E731
    if backend != "cuda":
        x = x if kind == "numpy" else x.get()
        return contiguous(np.broadcast_to(x.astype(np.float32, copy=False), lead))
    cp = _device.cupy()
    with cp.cuda.Device(device_id):
        return contiguous(cp.broadcast_to(cp.asarray(x, dtype=cp.float32), lead))


def validate(q, k, v, *, causal, softmax_scale, return_lse, backend,
             num_threads=1, allow_tf32=False, fp32_kernel="auto", window=None, softcap=0.0,
             alibi_slopes=None) -> Problem:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    causal = _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    if not isinstance(num_threads, numbers.Integral) or isinstance(num_threads, (bool, np.bool_)):
        raise TypeError(f"num_threads must be a positive int, got {num_threads!r}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads}")

    kinds = {name: _array_kind(name, x) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(kinds.values())) > 1:
        got = ", ".join(f"{n} is {kind}" for n, kind in kinds.items())
        raise TypeError(f"q, k and v must all be NumPy arrays or all CuPy arrays ({got}); "
                        "convert with cupy.asarray(...) or cupy.asnumpy(...)")
    on_gpu = kinds["q"] == "cupy"
    if on_gpu:
        devices = tuple(x.device.id for x in (q, k, v))
        if len(set(devices)) > 1:
            raise ValueError(f"q, k and v are on different GPUs (devices {devices}); "
                             "copy them to one device first")

    masked = sys.modules.get("numpy.ma")   # no masked array exists before numpy.ma is imported (~10 ms)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if masked is not None and isinstance(x, masked.MaskedArray):
            raise TypeError(f"{name} is a numpy.ma.MaskedArray, whose mask flash_attention would "
                            f"ignore; pass a plain array ({name}.filled(value) or numpy.asarray({name}))")
        if not _dtype(x)[0].isnative:
            raise TypeError(f"{name} has non-native byte order (dtype {np.dtype(x.dtype).str}); "
                            f"convert it with {name}.astype({name}.dtype.newbyteorder('='))")
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., N, d) with at least 2 dims, "
                             f"got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} has an empty dimension (shape {tuple(x.shape)}); "
                             "every dimension must be >= 1")
    group = _query_group(q, k, v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (..., Nk, d), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head dim d, got {d} and {k.shape[-1]}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim d (the last dim of q, k and v) must be at most {MAX_HEAD_DIM}, "
                         f"got {d}")
    Nq, Nk = q.shape[-2], k.shape[-2]
    if max(Nq, Nk) > _INT32_MAX:
        raise ValueError(f"the sequence lengths of q and k must be below 2**31, got Nq={Nq}, Nk={Nk}")
    lead = tuple(q.shape[:-2])
    if max(kernel_dims(lead, group)) > _INT32_MAX:   # the kernels' int counters
        raise ValueError(f"the leading dims of q, k and v {lead} must give heads (the last) and "
                         "batch (the product of the others) below 2**31 each")

    dtypes = {name: _dtype(x)[1] for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n} {t}" for n, t in dtypes.items())
        raise TypeError(f"q, k and v must have the same dtype, got {got}")
    dtype = dtypes["q"]

    if backend == "auto":
        backend = "cuda" if on_gpu else "c"
    if dtype not in BACKEND_DTYPES[backend]:
        allowed = BACKEND_DTYPES[backend]
        raise TypeError(f"backend {backend!r} takes q, k, v of dtype "
                        f"{', '.join(allowed[:-1])} or {allowed[-1]}, got {dtype}: "
                        f"{_DTYPE_ADVICE[backend]}")
    if backend != "c" and num_threads != 1:
        raise ValueError(f"num_threads applies to the C backend only; this call runs on the "
                         f"{backend!r} backend, so leave num_threads at 1 (got {num_threads})")
    if backend == "cuda":
        _device.cupy()   # raises BackendUnavailableError with the install hint
    elif backend == "c":
        from . import _c_backend
        _c_backend.require()

    if softmax_scale is None:
        scale = 1.0 / math.sqrt(d)
    elif _is_real(softmax_scale):
        scale = _as_float(softmax_scale)
        if not (math.isfinite(scale) and abs(scale) <= _FLOAT32_MAX):
            raise ValueError(f"softmax_scale must be a finite float32 number, got {softmax_scale!r}")
    else:
        raise TypeError(f"softmax_scale must be a real number or None, got {softmax_scale!r}")

    fp32 = _fp32_mode(allow_tf32, fp32_kernel, backend, dtype)
    window = window_pair(window, causal, Nq, Nk)
    softcap = check_softcap(softcap)
    alibi = None
    if alibi_slopes is not None:
        device_id = q.device.id if on_gpu else _device.current_device() if backend == "cuda" else None
        alibi = check_alibi(alibi_slopes, lead, on_gpu, backend, device_id)
    return Problem(q, k, v, backend, on_gpu, dtype, lead, Nq, Nk, d, scale, causal,
                   num_threads=int(num_threads), fp32=fp32, group=group, window=window, softcap=softcap,
                   alibi=alibi)


def _query_group(q, k, v) -> int:
    """q heads per k/v head. Heads are dim -3, the last leading dim; every other leading dim must
    match, and k and v may have fewer heads than q (GQA, or MQA with one) if they divide q's."""
    shapes = lambda: f"got shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"  # noqa: E731
    if q.ndim != k.ndim or q.shape[:-3] != k.shape[:-3] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError("q, k and v must have the same leading (batch, heads) dims, except that k "
                         f"and v may have fewer heads (dim -3) than q; {shapes()}")
    if q.ndim < 3:
        return 1
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads % kv_heads:
        raise ValueError(f"q has {heads} heads (dim -3) and k, v have {kv_heads}: for grouped-query "
                         f"attention q's heads must be a multiple of k's and v's; {shapes()}")
    return heads // kv_heads
