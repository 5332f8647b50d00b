"""flash_attention: one entry point for NumPy and CuPy arrays, C and CUDA backends."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _device, _interop, planner, reference
from ._typing import Array, Backend, Fp32Kernel
from ._validate import _INT32_MAX, Problem, validate


def flash_attention(q: Array, k: Array, v: Array, *, causal: bool = False, softmax_scale: float | None = None,
                    window: tuple[int, int] | None = None, softcap: float = 0.0, alibi_slopes: Array | None = None,
                    return_lse: bool = False, backend: Backend = "auto", num_threads: int = 1,
                    allow_tf32: bool = False, fp32_kernel: Fp32Kernel = "auto") -> Any:
    """FlashAttention-2 forward: O = softmax(softmax_scale * q k^T) v, without the N x N matrix.

    q: (..., Nq, d); k, v: (..., Nk, d) with the same leading (batch, heads) dims, 1 <= d <= 256.
        Grouped-query and multi-query attention: k and v may have fewer heads (dim -3, the last
        leading dim) than q, Hkv dividing q's H; query head h reads key/value head
        h // (H // Hkv), as in flash-attn and SDPA's enable_gqa. k and v are never repeated (the
        CUDA kernels see them with a zero head stride; the C twin reads each for its group).
    causal: mask key j for query i when j > i + (Nk - Nq) (bottom-right aligned); a row with
        every key masked gives O = 0 and L = -inf.
    softmax_scale: defaults to 1 / sqrt(d).
    window: a sliding window (left, right): query i sees key j when
        i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right (bottom-right aligned, as causal);
        -1 leaves that side unbounded, (-1, 0) is the causal mask. With causal=True, right
        becomes 0. Rows that see no key give O = 0 and L = -inf. Key tiles wholly outside
        every row's window are skipped, so the cost follows the window's width.
    softcap: when > 0, each score x = softmax_scale * q.k becomes softcap * tanh(x / softcap)
        (Gemma 2's logit softcapping), with softcap rounded to float32 as the kernels use it.
    alibi_slopes: ALiBi, one slope per head, shape (heads,) or q.shape[:-2] (per batch index
        and head): the score of query i and key j loses slope * |i + (Nk - Nq) - j| (after
        softcap). Any real array (NumPy, CuPy on q's device, torch, a list), used as float32;
        host slopes must be finite (CuPy slopes are not read back to check).
    return_lse: also return L, the natural-log logsumexp of the (modded) scores, float32 (..., Nq).
    backend: "auto" (CuPy arrays -> "cuda", NumPy arrays -> "c"), "c" (float32/float64),
        "cuda" (float32/float16/bfloat16; NumPy inputs are copied to the GPU and back), or
        "reference" (naive float64 NumPy, the tests' oracle).
    num_threads: C backend only (a ValueError elsewhere unless 1): run the batch * heads
        problems on up to this many Python threads, each calling the single-threaded C twin
        on a contiguous slice of heads (the C call releases the GIL). The result is bitwise
        the same for every num_threads; one head never uses more than one thread.
    allow_tf32: float32 on the CUDA backend may use TF32 tensor cores (inputs rounded to 10-bit
        mantissas, relative error ~1e-3 in the scores; several times faster). Default False.
    fp32_kernel: how float32 runs on the CUDA backend when allow_tf32 is False, accurate to
        about fp32 either way: "auto" (3xTF32 tensor cores on sm_80 and later, "simt" before),
        "3xtf32" (each operand split into two TF32 parts, three MMAs), "simt" (CUDA cores).

    Returns O with q's dtype and array type (and L when return_lse). On CuPy arrays the call
    runs on the current stream and does not synchronize the host; a call that repeats an earlier
    one's shapes, strides, dtypes, device and keywords (ALiBi aside) reuses its checks and plan
    (~16 µs of host time instead of ~100); one that differs from it only in k's and v's number
    of keys (slices of a growing KV cache) reuses its checks and is planned for its Nk. torch
    tensors, JAX arrays and other DLPack / __cuda_array_interface__ arrays go in without copies
    and come back as their own kind (CUDA torch tensors run on torch's current stream); see
    flashattn_cupy._interop.
    """
    key = _call_key(q, k, v, (causal, softmax_scale, window, softcap, alibi_slopes, backend, num_threads,
                              allow_tf32, fp32_kernel), return_lse)
    try:
        call = _CALLS.get(key) if key is not None else None
    except TypeError:   # an unhashable option (a window given as a list): not kept
        key = call = None
    if call is None and key is not None:   # the same call but for the number of keys?
        call = _for_keys(key, q, k, v, window)
    if call is not None:   # validated and planned before: the same launches on these arrays
        O, L = call(q, k, v)
        return (O, L) if return_lse else O
    with _interop.caller_arrays(q, k, v) as (q, k, v, export):
        problem = validate(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                           backend=backend, num_threads=num_threads, allow_tf32=allow_tf32,
                           fp32_kernel=fp32_kernel, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
        O, L, call = _run(problem)
        if key is not None and call is not None:
            if len(_CALLS) >= _CALLS_MAX:   # a bound, for programs whose shapes never repeat
                _CALLS.clear()
                _GROWING.clear()
            _CALLS[key] = call
            if not call.copies:
                _GROWING[_growing_key(key)] = call
        return (export(O), export(L)) if return_lse else export(O)


# CUDA calls on CuPy arrays, by _call_key: a call that matches an earlier one in all that
# validation and planning read reuses its Call (_cuda_backend), skipping ~85 µs of Python: the
# checks, the plan, the strides and the kernel's arguments. A model repeats its calls step after
# step; a call with new shapes, layouts, dtypes, device, options or planner defaults gets its own.
_CALLS: dict = {}
_CALLS_MAX = 1024


# Kept calls by _growing_key: _CALLS' key less the number of keys. A decoding loop reads a KV
# cache one key longer each step (k_cache[:, :, :n]: the same strides, a new shape), so each step
# is a new key of _CALLS; the Call kept for another Nk is re-made for this one (Call.for_keys),
# without validating again. Not kept in _CALLS: a growing cache never repeats its Nk.
_GROWING: dict = {}


def _growing_key(key: tuple) -> tuple:
    """A _call_key without k's and v's Nk (their shapes, items 4 and 8, less dim -2)."""
    k_shape, v_shape = key[4], key[8]
    return (*key[:4], k_shape[:-2] + k_shape[-1:], *key[5:8], v_shape[:-2] + v_shape[-1:], *key[9:])


def _for_keys(key: tuple, q, k, v, window):
    """The call kept for another number of keys, made for this one's (k.shape[-2]); None if none
    is kept, or if Nk is one validation would refuse (0, 2**31 or more, k's not v's)."""
    template = _GROWING.get(_growing_key(key))   # hashable: _CALLS.get(key) was
    Nk = key[4][-2]
    if template is None or key[8][-2] != Nk or not 1 <= Nk <= _INT32_MAX:
        return None
    return template.for_keys(q, k, v, Nk, window, _plan)


def _call_key(q, k, v, options: tuple, return_lse):
    """What validation and planning read of a call, as a dict key; None where a call is not kept:
    inputs other than three cupy.ndarray (NumPy's C backend is not worth it, other libraries go
    through _interop), ALiBi slopes (their values are checked), return_lse not a bool (refused),
    a window other than a tuple of ints. return_lse only picks what is returned, so both values
    share a key. The key holds the options' types (causal=1 equals True, but is refused); it may
    hold an unhashable option (a list as softmax_scale): the caller's lookup catches that."""
    ndarray = _device.ndarray_type()
    if ndarray is None or type(q) is not ndarray or type(k) is not ndarray or type(v) is not ndarray \
            or options[4] is not None or (return_lse is not True and return_lse is not False):
        return None
    if not plain_window(options[2]):
        return None
    return (q.shape, q.strides, q.dtype, q.data.device_id, k.shape, k.strides, k.dtype, k.data.device_id,
            v.shape, v.strides, v.dtype, v.data.device_id, options, tuple(map(type, options)),
            planner.WGMMA_BY_DEFAULT, planner.DECODE_BY_DEFAULT)


def plain_window(window) -> bool:
    """Whether a window option can go in a kept call's key: None or a tuple of ints (a pair's hash
    hides its items' types, which validation reads: True == 1 == 1.0)."""
    return window is None or (type(window) is tuple and all(type(w) is int for w in window))


def plan_for(q: Array, k: Array, v: Array, *, causal: bool = False, softmax_scale: float | None = None,
             window: tuple[int, int] | None = None, softcap: float = 0.0, alibi_slopes: Array | None = None,
             backend: Backend = "auto", num_threads: int = 1, allow_tf32: bool = False,
             fp32_kernel: Fp32Kernel = "auto") -> planner.Plan | None:
    """The Plan flash_attention would run for these arguments (None for "reference").

    q: (..., Nq, d); k, v: (..., Nk, d): arrays of any kind flash_attention takes, which are
    validated as it does but not computed on (no kernel is compiled or launched).
    """
    with _interop.caller_arrays(q, k, v) as (q, k, v, _):
        problem = validate(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=False,
                           backend=backend, num_threads=num_threads, allow_tf32=allow_tf32,
                           fp32_kernel=fp32_kernel, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
        return _plan(problem)


def _device_id(problem: Problem) -> int:
    return problem.q.device.id if problem.on_gpu else _device.current_device()


def _plan(problem: Problem, device_id: int | None = None, decode: bool | None = None, page: int = 0):
    """The problem's plan; for CUDA on device_id (None: the arrays' device, or the current one).
    decode, page: planner.plan's (None: the planner's choice; a paged KV cache's page, 0: none)."""
    if problem.backend == "reference":
        return None
    smem_limit = arch = sm_count = None
    if problem.backend == "cuda":
        device_id = _device_id(problem) if device_id is None else device_id
        smem_limit, arch = _device.smem_limit(device_id), _device.compute_capability(device_id)
        sm_count = _device.sm_count(device_id)
    from ._cuda_backend import mask_options
    return planner.cached_plan(problem.Nq, problem.Nk, problem.d, dtype=problem.dtype,
                        causal=problem.causal, batch=problem.batch, heads=problem.heads,
                        backend=problem.backend, smem_limit=smem_limit, arch=arch,
                        num_threads=problem.num_threads, fp32=problem.fp32,
                        group=problem.group, sm_count=sm_count, decode=decode, page=page,
                        **mask_options(problem))


def _host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def _run(problem: Problem):
    """(O, L, call): the results as the caller's array type, and for a CUDA call on CuPy arrays
    the _cuda_backend.Call that computed them (else None)."""
    plan = _plan(problem)
    if problem.backend == "cuda":
        from . import _cuda_backend
        O, L, call = _cuda_backend.run_call(problem, plan, _device_id(problem))
        return (O, L, call) if problem.on_gpu else (O.get(), L.get(), None)
    if problem.backend == "c":
        from . import _c_backend
        O, L = _c_backend.run(problem, plan, *(_host(x) for x in (problem.q, problem.k, problem.v)))
    else:
        O, L = reference.attention(*(_host(x) for x in (problem.q, problem.k, problem.v)),
                                   causal=problem.causal, softmax_scale=problem.scale, window=problem.window,
                                   softcap=problem.softcap, alibi_slopes=problem.alibi)
        O, L = O.astype(problem.q.dtype), L.astype(np.float32)
    if problem.on_gpu:
        cp = _device.cupy()
        with cp.cuda.Device(problem.q.device.id):
            return cp.asarray(O), cp.asarray(L), None
    return O, L, None
