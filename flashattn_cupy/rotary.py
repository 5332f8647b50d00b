"""Rotary position embeddings as flash-attn's flash_attn_with_kvcache applies them to the new
keys and to the queries before attending (RoFormer's rotation of pairs of dims by position):

    x1' = x1 cos(p) - x2 sin(p),   x2' = x1 sin(p) + x2 cos(p)

over the first rotary_dim dims of each head (the rest unchanged), pairs (0, 1), (2, 3), ... when
interleaved (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX). Computed in float32 (float64 for
float64 inputs) and rounded to the input type once, as flash-attn's kernel rounds its result.
"""
from __future__ import annotations

import numpy as np

from . import _device, _interop


def tables(cos, sin, head_dim: int, on_gpu: bool):
    """(cos, sin) checked: (seqlen_ro, rotary_dim / 2) each, rotary_dim even and <= head_dim,
    as arrays of the cache's kind; raises ValueError / TypeError saying what to fix."""
    if (cos is None) != (sin is None):
        raise ValueError("pass rotary_cos and rotary_sin together, or neither")
    cos, sin = (_interop.small_array(name, x, "an array (seqlen_ro, rotary_dim / 2)")
                for name, x in (("rotary_cos", cos), ("rotary_sin", sin)))
    if cos.ndim != 2 or tuple(sin.shape) != tuple(cos.shape) or not 1 <= 2 * cos.shape[1] <= head_dim:
        raise ValueError(f"rotary_cos and rotary_sin must both have shape (seqlen_ro, rotary_dim / 2) with "
                         f"rotary_dim <= headdim {head_dim}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, x in (("rotary_cos", cos), ("rotary_sin", sin)):
        if np.dtype(x.dtype).kind != "f":
            raise TypeError(f"{name} must hold floats, got dtype {np.dtype(x.dtype)}")
        if _device.is_cupy_array(x) != on_gpu:
            raise TypeError(f"{name} must be on the cache's side ({'CuPy' if on_gpu else 'NumPy'}), got "
                            f"{type(x).__module__}.{type(x).__name__}")
    return cos, sin


def rotate(x, cos, sin, positions, interleaved: bool):
    """x (batch, n, heads, d) rotated at positions (batch, n) (host ints, < seqlen_ro), a new
    array of x's dtype and kind."""
    xp = _device.cupy() if _device.is_cupy_array(x) else np
    half = cos.shape[1]
    if positions.size and (positions.min() < 0 or positions.max() >= cos.shape[0]):
        raise ValueError(f"rotary_cos and rotary_sin have {cos.shape[0]} positions (dim 0) and the new keys and "
                         f"queries need positions {positions.min()} to {positions.max()}: pass longer tables")
    compute = np.float64 if x.dtype == np.float64 else np.float32
    at = xp.asarray(positions)
    c, s = (t.astype(compute)[at][:, :, None, :] for t in (cos, sin))   # (batch, n, 1, half)
    head = x[..., :2 * half].astype(compute)
    x1, x2 = (head[..., 0::2], head[..., 1::2]) if interleaved else (head[..., :half], head[..., half:])
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    out = x.copy()
    out[..., :2 * half] = (xp.stack((y1, y2), axis=-1).reshape(head.shape) if interleaved
                           else xp.concatenate((y1, y2), axis=-1)).astype(x.dtype)
    return out
