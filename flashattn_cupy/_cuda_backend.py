"""The CUDA path: strides and sizes from CuPy arrays, one launch on the current stream.
Nothing here synchronizes the host; the kernel comes from kernels.get (compiled once)."""
from __future__ import annotations

import numpy as np

from . import kernels
from ._device import cupy


def _strides(x, cp):
    """(x, (sb, sh, sn)): element strides with x[b, h, n, c] at sb*b + sh*h + sn*n + c, where
    b runs over all leading dims but the last (flattened) and h over the last. Copies x only
    when its layout has no such form (last dim not contiguous, or batch dims that do not
    collapse into one stride)."""
    if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = cp.ascontiguousarray(x)
    st = [s // x.itemsize for s in x.strides]
    lead, lead_st = x.shape[:-2], st[:-2]
    sh = lead_st[-1] if lead else 0
    bdims = [(n, s) for n, s in zip(lead[:-1], lead_st[:-1]) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(bdims, bdims[1:])):
        return _strides(cp.ascontiguousarray(x), cp)
    sb = bdims[-1][1] if bdims else 0
    return x, (sb, sh, st[-2])


def run(problem, plan, device_id: int):
    """(O, L) as CuPy arrays on device_id: O like q (contiguous), L float32 (..., Nq)."""
    cp = cupy()
    with cp.cuda.Device(device_id):
        q, k, v = (cp.asarray(x) for x in (problem.q, problem.k, problem.v))
        (q, qs), (k, ks), (v, vs) = (_strides(x, cp) for x in (q, k, v))
        O = cp.empty(q.shape, dtype=q.dtype)
        L = cp.empty(q.shape[:-1], dtype=cp.float32)
        _, os_ = _strides(O, cp)
        i32, i64 = np.int32, np.int64
        args = (q, k, v, O, L,
                i32(problem.batch), i32(problem.heads), i32(problem.Nq), i32(problem.Nk), i32(problem.d),
                *map(i64, qs), *map(i64, ks), *map(i64, vs), *map(i64, os_),
                np.float32(problem.scale))
        kernels.get(plan, device_id)(plan.grid, (plan.threads,), args, shared_mem=plan.smem_bytes)
    return O, L
