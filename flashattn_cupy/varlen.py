"""flash_attention_varlen: a batch of sequences of different lengths, packed without padding,
as the flash-attn package's flash_attn_varlen_func takes them.

Sequence s holds rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] of q and cu_seqlens_k[s]:cu_seqlens_k[s + 1]
of k and v, and attends only to its own keys (bottom-right aligned within it, for causal and
windows). The CUDA path is one launch over (query tiles of the longest sequence, heads,
sequences) whose tiles past a sequence's end return at once (_cuda_backend.run_varlen); the C
path calls the C twin once per sequence on views of the packed arrays.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _device, _interop, planner, reference
from ._typing import Array, Backend, Fp32Kernel
from ._validate import Problem, check_alibi, validate, window_pair

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class VarlenProblem:
    """A validated varlen call, as _cuda_backend.run_varlen reads it."""

    q: Any                  # (total_q, H, d), NumPy or CuPy
    k: Any                  # (total_k, Hkv, d)
    v: Any
    cu_seqlens_q: Any       # int, batch + 1: on the GPU for CUDA inputs, else NumPy
    cu_seqlens_k: Any
    max_seqlen_q: int       # the longest sequence's rows (measured, not the caller's bound)
    max_seqlen_k: int
    lengths_q: np.ndarray   # host copies: rows of each sequence
    lengths_k: np.ndarray
    backend: str
    on_gpu: bool
    dtype: str
    d: int
    scale: float
    causal: bool
    fp32: str
    group: int
    window: tuple
    softcap: float
    alibi: Any              # float32 (batch, H), contiguous, or None
    num_threads: int = 1    # C backend: Python threads sharing each sequence's heads


def flash_attention_varlen(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None, window: tuple[int, int] | None = None,
                           softcap: float = 0.0, alibi_slopes: Array | None = None, return_lse: bool = False,
                           backend: Backend = "auto", num_threads: int = 1, allow_tf32: bool = False,
                           fp32_kernel: Fp32Kernel = "auto") -> Any:
    """Attention over a packed batch of variable-length sequences, as flash-attn's varlen call.

    q: (total_q, heads, d); k, v: (total_k, kv_heads, d), the sequences' rows one after another
        (the (batch, seqlen, heads, d) tensors of flash_attn_func with the padding taken out);
        kv_heads divides heads (GQA/MQA, as flash_attention).
    cu_seqlens_q, cu_seqlens_k: int32 or int64 1-D arrays of batch + 1 offsets: 0, then each
        sequence's end, nondecreasing, the last equal to total_q (total_k). Sequences may be
        empty; one with queries but no keys gives O = 0 and L = -inf on its rows. They are
        checked on the host: CuPy (or CUDA torch) offsets are copied there, two small transfers
        that wait for the GPU's queue up to them.
    max_seqlen_q, max_seqlen_k: ints at least every sequence's length (flash-attn's bounds; the
        kernels are planned for the longest sequence found in the offsets).
    causal, softmax_scale, window, softcap, return_lse, backend, allow_tf32, fp32_kernel: as in
        flash_attention, each sequence on its own (windows and causal are bottom-right aligned
        within the sequence).
    alibi_slopes: (heads,) or (batch, heads): one slope per head, or per sequence and head.
    num_threads: C backend only: each sequence's heads shared by up to this many Python threads,
        as flash_attention's num_threads (the result is bitwise the same for every value).

    Returns O, (total_q, heads, d) of q's dtype and kind, and with return_lse L, float32
    (heads, total_q) (flash-attn's softmax_lse layout).
    """
    with _interop.caller_arrays(q, k, v) as (q, k, v, export):
        problem = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                            softmax_scale=softmax_scale, window=window, softcap=softcap,
                            alibi_slopes=alibi_slopes, return_lse=return_lse, backend=backend,
                            num_threads=num_threads, allow_tf32=allow_tf32, fp32_kernel=fp32_kernel)
        O, L = _run(problem)
        return (export(O), export(L)) if return_lse else export(O)


def _check_packed(name: str, x) -> None:
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"{name} must have shape (total_{'q' if name == 'q' else 'k'}, heads, d) (the "
                         f"sequences' rows packed), got shape {tuple(getattr(x, 'shape', ()))}")


def _offsets(name: str, cu, total: int, max_seqlen, max_name: str) -> tuple[Any, np.ndarray]:
    """(cu as given, or NumPy from a list; its lengths on the host) after every check."""
    cu = _interop.small_array(name, cu, "an int32 or int64 1-D array of sequence offsets")
    if np.dtype(cu.dtype) not in (np.int32, np.int64):
        raise TypeError(f"{name} must be int32 or int64, got {np.dtype(cu.dtype)}: cast with .astype(int32)")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 1 offsets, got shape {tuple(cu.shape)}")
    if isinstance(max_seqlen, (bool, np.bool_)) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"{max_name} must be an int, got {max_seqlen!r}")
    host = np.asarray(cu if isinstance(cu, np.ndarray) else cu.get(), np.int64)
    lengths = np.diff(host)
    if host[0] != 0 or (lengths < 0).any() or host[-1] != total:
        raise ValueError(f"{name} must start at 0, never decrease, and end at {total} (the rows of "
                         f"{'q' if name.endswith('q') else 'k and v'}), got {_show(host)}")
    longest = int(lengths.max(initial=0))
    if not (longest <= int(max_seqlen) <= _INT32_MAX):
        raise ValueError(f"{max_name} must be at least the longest sequence ({longest}) and below 2**31, "
                         f"got {max_seqlen}")
    return cu, lengths


def _show(x: np.ndarray) -> str:
    return str(x.tolist()) if x.size <= 12 else f"[{', '.join(map(str, x[:5].tolist()))}, ..., {x[-1]}]"


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, softmax_scale,
              window, softcap, alibi_slopes, return_lse, backend, num_threads, allow_tf32,
              fp32_kernel) -> VarlenProblem:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_packed(name, x)

    def as_heads(x):   # (total, heads, d) as (heads, total, d), a 1-row stand-in when total is 0
        if x.shape[0] == 0:   # flash_attention's checks refuse empty dims; nothing is read from it
            xp = np if isinstance(x, np.ndarray) else _device.cupy()
            x = xp.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype)
        return x.swapaxes(0, 1)
    # flash_attention's checks of kinds, devices, dtypes, heads, d, scale, flags and softcap
    base = validate(as_heads(q), as_heads(k), as_heads(v), causal=causal, softmax_scale=softmax_scale,
                    return_lse=return_lse, backend=backend, num_threads=num_threads, allow_tf32=allow_tf32,
                    fp32_kernel=fp32_kernel, softcap=softcap)
    cu_q, lengths_q = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    cu_k, lengths_k = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    if lengths_q.size != lengths_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold one offset per sequence and one more, the same "
                         f"count, got {lengths_q.size + 1} and {lengths_k.size + 1}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):   # NumPy offsets go anywhere
        if _device.is_cupy_array(cu) and not base.on_gpu:
            raise TypeError(f"{name} is a CuPy array and q, k, v are NumPy arrays; pass NumPy offsets, or "
                            "CuPy q, k, v")
        if _device.is_cupy_array(cu) and cu.device.id != q.device.id:
            raise ValueError(f"{name} is on GPU {cu.device.id} and q, k, v on GPU {q.device.id}; copy it there")
    Nq, Nk = int(lengths_q.max(initial=0)), int(lengths_k.max(initial=0))
    heads = q.shape[1]
    batch = lengths_q.size
    device_id = q.device.id if base.on_gpu else _device.current_device() if base.backend == "cuda" else None
    alibi = None
    if alibi_slopes is not None:
        alibi = check_alibi(alibi_slopes, (batch, heads), base.on_gpu, base.backend, device_id)
    return VarlenProblem(q, k, v, cu_q, cu_k, Nq, Nk, lengths_q, lengths_k, base.backend, base.on_gpu, base.dtype,
                         base.d, base.scale, base.causal, base.fp32, base.group,
                         window_pair(window, base.causal, Nq, Nk), base.softcap, alibi, base.num_threads)


def _run(problem: VarlenProblem):
    if problem.backend == "cuda":
        from . import _cuda_backend
        device_id = problem.q.device.id if problem.on_gpu else _device.current_device()
        O, L = _cuda_backend.run_varlen(problem, device_id)
        return (O, L) if problem.on_gpu else (O.get(), L.get())
    host = lambda x: x if isinstance(x, np.ndarray) else x.get()  # noqa: E731
    q, k, v = (host(x) for x in (problem.q, problem.k, problem.v))
    O, L = _per_sequence(problem, q, k, v, None if problem.alibi is None else host(problem.alibi))
    if problem.on_gpu:
        cp = _device.cupy()
        with cp.cuda.Device(problem.q.device.id):
            return cp.asarray(O), cp.asarray(L)
    return O, L


def _per_sequence(problem: VarlenProblem, q, k, v, alibi):
    """The C twin (or the reference) once per sequence, on views of the packed arrays."""
    total_q, H, d = q.shape
    O = np.zeros(q.shape, dtype=q.dtype)
    L = np.full((H, total_q), -np.inf, dtype=np.float32)   # a sequence without keys keeps O = 0, L = -inf
    starts_q = np.concatenate([[0], np.cumsum(problem.lengths_q)])
    starts_k = np.concatenate([[0], np.cumsum(problem.lengths_k)])
    for s, (nq, nk) in enumerate(zip(problem.lengths_q.tolist(), problem.lengths_k.tolist())):
        if nq == 0 or nk == 0:
            continue
        rows, keys = slice(starts_q[s], starts_q[s] + nq), slice(starts_k[s], starts_k[s] + nk)
        q_s, k_s, v_s = (x.swapaxes(0, 1) for x in (q[rows], k[keys], v[keys]))   # (heads, n, d) views
        slopes = None if alibi is None else alibi[s]
        if problem.backend == "reference":
            O_s, L_s = reference.attention(q_s, k_s, v_s, causal=problem.causal, softmax_scale=problem.scale,
                                           window=problem.window, softcap=problem.softcap, alibi_slopes=slopes)
        else:
            from . import _c_backend
            seq = Problem(q_s, k_s, v_s, "c", False, problem.dtype, (H,), nq, nk, d, problem.scale, problem.causal,
                          group=problem.group, window=problem.window, softcap=problem.softcap, alibi=slopes)
            plan = planner.cached_plan(nq, nk, d, dtype=problem.dtype, causal=problem.causal, heads=H, backend="c",
                                       num_threads=problem.num_threads)
            O_s, L_s = _c_backend.run(seq, plan, q_s, k_s, v_s)
        O[rows] = O_s.swapaxes(0, 1)
        L[:, rows] = L_s
    return O, L
