"""The CUDA path: strides and sizes from CuPy arrays, one launch on the current stream.
Nothing here synchronizes the host; the kernel comes from kernels.get (compiled once)."""
from __future__ import annotations

import math

import numpy as np

from . import kernels
from ._device import cupy


def _unit_stride(x, cp):
    """x, or a contiguous copy of it when its last dim is not contiguous (the kernels need that)."""
    return cp.ascontiguousarray(x) if x.shape[-1] > 1 and x.strides[-1] != x.itemsize else x


_NULL = np.uint64(0)   # a null pointer argument (the kernels test for it)
_PACKED: dict = {}     # (int32s, int64s, float32s) -> the kernel arguments, as NumPy scalars


def packed(i32s: tuple, i64s: tuple, f32s: tuple = ()) -> tuple:
    """A launch's scalar arguments typed as the kernel declares them (int, long long, float),
    made once per distinct tuple: NumPy scalars cost ~0.2 µs each and a launch passes 20 to 30,
    the same ones call after call in a model's loop."""
    key = (i32s, i64s, f32s, tuple(math.copysign(1.0, f) for f in f32s))   # -0.0 == 0.0, but not as an argument
    found = _PACKED.get(key)
    if found is None:
        if len(_PACKED) >= 4096:   # a bound, for programs whose shapes never repeat
            _PACKED.clear()
        found = _PACKED[key] = (*map(np.int32, i32s), *map(np.int64, i64s), *map(np.float32, f32s))
    return found


def _batch_stride(x):
    """The element stride sb with x's batch dims (every leading dim but the last) at sb * b for
    their flattened index b; None when they do not collapse into one stride."""
    if x.ndim <= 4:   # the usual (B, H, N, d), (H, N, d), (N, d): at most one batch dim, no walk
        return x.strides[0] // x.itemsize if x.ndim == 4 and x.shape[0] != 1 else 0
    bdims = [(n, s // x.itemsize) for n, s in zip(x.shape[:-3], x.strides[:-3]) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(bdims, bdims[1:])):
        return None
    return bdims[-1][1] if bdims else 0


def _strides(x, cp):
    """(x, (sb, sh, sn)): element strides with x[b, h, n, c] at sb*b + sh*h + sn*n + c, where
    b runs over all leading dims but the last (flattened) and h over the last. Copies x only
    when its layout has no such form (last dim not contiguous, or batch dims that do not
    collapse into one stride)."""
    x = _unit_stride(x, cp)
    sb = _batch_stride(x)
    if sb is None:
        return _strides(cp.ascontiguousarray(x), cp)
    sh = x.strides[-3] // x.itemsize if x.ndim > 2 else 0
    return x, (sb, sh, x.strides[-2] // x.itemsize)


def window_args(window, Nq: int, Nk: int) -> tuple[int, int]:
    """The kernels' (left, right) from the problem's window ((-1, -1) unbounded): an unbounded
    side clamped to Nk (left) or Nq (right), which covers every row (csrc/fa_mask.cuh)."""
    left, right = window
    return (Nk if left < 0 else min(left, Nk)), (Nq if right < 0 else min(right, Nq))


def features(problem):
    """(window, softcap, alibi) of a validated problem (_validate.Problem or varlen's)."""
    return problem.window, problem.softcap, problem.alibi


def mask_options(problem) -> dict:
    """planner.plan's window and score_mod keywords for a validated problem: which MASK variant
    of the kernels its window and score mods need."""
    return {"window": problem.window != (-1, -1), "score_mod": problem.softcap > 0 or problem.alibi is not None}


def run(problem, plan, device_id: int):
    """(O, L) as CuPy arrays on device_id: O like q (contiguous), L float32 (..., Nq). GQA needs
    no copies: the kernels read k/v head h // group for q head h."""
    cp = cupy()
    with cp.cuda.Device(device_id):
        q, k, v = (cp.asarray(x) for x in (problem.q, problem.k, problem.v))
        O = cp.empty(q.shape, dtype=q.dtype)
        L = cp.empty(q.shape[:-1], dtype=cp.float32)
        (q, qs), (k, ks), (v, vs) = (_strides(x, cp) for x in (q, k, v))
        os_ = _strides(O, cp)[1]   # O and L are ours: contiguous
        window, softcap, alibi = features(problem)
        H = problem.heads
        if plan.splits:   # split-KV decoding: the partials, then their merge
            launch_decode(plan, device_id, q, k, v, O, L, qs, ks, vs, os_, (H * problem.Nq, problem.Nq),
                          batch=problem.batch, heads=H, group=problem.group, Nq=problem.Nq, Nk=problem.Nk,
                          d=problem.d, window=window_args(window, problem.Nq, problem.Nk),
                          scale=problem.scale, softcap=softcap, alibi=alibi)
            return O, L
        launch(plan, device_id, q, k, v, O, L, qs, ks, vs, os_, (H * problem.Nq, problem.Nq),
               batch=problem.batch, heads=H, group=problem.group, Nq=problem.Nq, Nk=problem.Nk,
               d=problem.d, window=window_args(window, problem.Nq, problem.Nk), scale=problem.scale,
               softcap=softcap, alibi=alibi)
    return O, L


def launch(plan, device_id, q, k, v, O, L, qs, ks, vs, os_, ls, *, batch, heads, group, Nq, Nk, d,
           window, scale, softcap=0.0, alibi=None, cu_q=None, cu_k=None):
    """One launch of plan's kernel: arrays, their element strides (b, h, n) (L's (b, h)), sizes,
    the kernels' window pair, scale, softcap; alibi (float32, one slope per (b, h), contiguous)
    and the varlen offsets cu_q, cu_k (int32, batch + 1 each) or None."""
    args = (q, k, v, _NULL if alibi is None else alibi, _NULL if cu_q is None else cu_q,
            _NULL if cu_k is None else cu_k, O, L,
            *packed((batch, heads, group, Nq, Nk, d, *window), (*qs, *ks, *vs, *os_, *ls), (scale, softcap)))
    kernels.get(plan, device_id)(plan.grid, (plan.threads,), args, shared_mem=plan.smem_bytes)


COMBINE_WARPS = 4           # flash_decode_combine: one warp a query row, 128 threads a block
COMBINE_BLOCKS_MAX = 65535   # its grid strides over the rest


def launch_decode(plan, device_id, q, k, v, O, L, qs, ks, vs, os_, ls, *, batch, heads, group, Nq, Nk, d,
                  window, scale, softcap=0.0, alibi=None):
    """Split-KV decoding (csrc/flash_decode.cu): plan.splits partial (O_s, L_s) per query row into a
    float32 workspace from CuPy's memory pool, then their merge into O (q's dtype) and L. Two
    launches on the current stream; the workspace returns to the pool when this returns, which
    is safe: the pool hands it out again only in stream order."""
    cp = cupy()
    D, splits = plan.head_dim_bound, plan.splits
    rows = batch * heads * Nq
    work = cp.empty(rows * splits * (D + 1), dtype=cp.float32)
    Op, Lp = work[:rows * splits * D], work[rows * splits * D:]
    args = (q, k, v, _NULL if alibi is None else alibi, Op, Lp,
            *packed((batch, heads, group, Nq, Nk, d, *window), (*qs, *ks, *vs), (scale, softcap)))
    kernels.get(plan, device_id)(plan.grid, (plan.threads,), args, shared_mem=plan.smem_bytes)
    combine = kernels.get(kernels.Variant(plan.combine), device_id)
    blocks = min(-(-rows // COMBINE_WARPS), COMBINE_BLOCKS_MAX)
    combine((blocks,), (32 * COMBINE_WARPS,),
            (Op, Lp, O, L, *packed((batch, heads, Nq, d, D, splits), (*os_, *ls))))


def run_varlen(problem, device_id: int):
    """(O, L) for a packed variable-length batch (flashattn_cupy.varlen's problem): q (total_q, H,
    d), k, v (total_k, Hkv, d), sequence s at rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] (and
    likewise for k, v). One launch over (tiles of the longest sequence, heads, sequences); tiles
    past a sequence's end return at once, so nothing is padded. O like q, L (H, total_q) float32."""
    from . import _device, planner
    cp = cupy()
    with cp.cuda.Device(device_id):
        q, k, v = (_unit_stride(cp.asarray(x), cp) for x in (problem.q, problem.k, problem.v))
        (total_q, H, d), kv_heads = q.shape, k.shape[1]
        O = cp.empty(q.shape, dtype=q.dtype)
        L = cp.empty((H, total_q), dtype=cp.float32)
        Nq, Nk = int(problem.max_seqlen_q), int(problem.max_seqlen_k)
        if total_q == 0 or Nq == 0:
            return O, L
        cu_q, cu_k = (cp.asarray(c, dtype=cp.int32) for c in (problem.cu_seqlens_q, problem.cu_seqlens_k))
        window, softcap, alibi = features(problem)
        plan = planner.cached_plan(Nq, max(Nk, 1), d, dtype=problem.dtype, causal=problem.causal,
                                   batch=cu_q.size - 1, heads=H, backend="cuda",
                                   smem_limit=_device.smem_limit(device_id),
                                   arch=_device.compute_capability(device_id),
                                   fp32=problem.fp32, decode=False, **mask_options(problem))
        # (b, h, n) element strides with b the sequence: its rows start at cu[b] (the kernels add it)
        rows = lambda x: (0, x.strides[1] // x.itemsize, x.strides[0] // x.itemsize)  # noqa: E731
        launch(plan, device_id, q, k, v, O, L, rows(q), rows(k), rows(v), rows(O), (0, total_q),
               batch=cu_q.size - 1, heads=H, group=H // kv_heads, Nq=Nq, Nk=Nk, d=d,
               window=window_args(window, Nq, Nk), scale=problem.scale, softcap=softcap,
               alibi=alibi, cu_q=cu_q, cu_k=cu_k)
    return O, L
