"""The CUDA path: strides and sizes from CuPy arrays, one launch on the current stream.
Nothing here synchronizes the host; the kernel comes from kernels.get (compiled once)."""
from __future__ import annotations

import dataclasses

import numpy as np

from . import kernels
from ._device import cupy
from .planner import GRID_YZ_MAX


def _unit_stride(x, cp):
    """x, or a contiguous copy of it when its last dim is not contiguous (the kernels need that)."""
    return cp.ascontiguousarray(x) if x.shape[-1] > 1 and x.strides[-1] != x.itemsize else x


def _batch_stride(x):
    """The element stride sb with x's batch dims (every leading dim but the last) at sb * b for
    their flattened index b; None when they do not collapse into one stride."""
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


def _grouped(q, k, v, O, L, group, cp):
    """GQA as views: q, O (..., Hkv * group, N, d) and L (..., Hkv * group, N) split to
    (..., Hkv, group, ...); k, v (..., Hkv, Nk, d) broadcast to (..., Hkv, group, Nk, d) with a
    zero stride, so the kernels' head index runs over the group and their batch over the rest."""
    split = lambda x, tail: x.reshape(x.shape[:-tail - 1] + (-1, group) + x.shape[-tail:])  # noqa: E731
    k, v = (cp.broadcast_to(_unit_stride(x, cp)[..., None, :, :], x.shape[:-2] + (group,) + x.shape[-2:])
            for x in (k, v))
    return split(q, 2), k, v, split(O, 2), split(L, 1)


def run(problem, plan, device_id: int):
    """(O, L) as CuPy arrays on device_id: O like q (contiguous), L float32 (..., Nq)."""
    cp = cupy()
    with cp.cuda.Device(device_id):
        q, k, v = (cp.asarray(x) for x in (problem.q, problem.k, problem.v))
        O = cp.empty(q.shape, dtype=q.dtype)
        L = cp.empty(q.shape[:-1], dtype=cp.float32)
        if problem.group == 1:
            _launch(problem, plan, device_id, q, k, v, O, L, problem.batch)
            return O, L
        qg, kg, vg, Og, Lg = _grouped(q, k, v, O, L, problem.group, cp)
        if all(_batch_stride(x) is not None for x in (qg, kg, vg, Og)):
            _launch(problem, plan, device_id, qg, kg, vg, Og, Lg, problem.batch)
        else:
            # the batch dims do not collapse with the k/v heads (e.g. (batch, seqlen, heads, d)
            # memory): one launch per batch index over its k/v heads, still reading k and v in place
            kv_heads = kg.shape[-4]
            per_index = dataclasses.replace(plan, grid=plan.grid[:2] + (min(kv_heads, GRID_YZ_MAX),))
            for i in np.ndindex(qg.shape[:-4]):
                _launch(problem, per_index, device_id, qg[i], kg[i], vg[i], Og[i], Lg[i], kv_heads)
    return O, L


def _launch(problem, plan, device_id, q, k, v, O, L, batch):
    cp = cupy()
    (q, qs), (k, ks), (v, vs) = (_strides(x, cp) for x in (q, k, v))
    os_ = _strides(O, cp)[1]   # O and L are ours: collapsing batch dims, contiguous rows
    i32, i64 = np.int32, np.int64
    args = (q, k, v, O, L,
            i32(batch), i32(problem.heads), i32(problem.Nq), i32(problem.Nk), i32(problem.d),
            *map(i64, qs), *map(i64, ks), *map(i64, vs), *map(i64, os_),
            np.float32(problem.scale))
    kernels.get(plan, device_id)(plan.grid, (plan.threads,), args, shared_mem=plan.smem_bytes)
