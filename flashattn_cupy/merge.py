"""merge_attention: the exact combination of two attentions over disjoint key sets.

With O_a, L_a the attention and logsumexp of the queries over keys A, and O_b, L_b over keys B,
the attention over A and B is the softmax-weighted mean of the two: with m = max(L_a, L_b),
    L = m + log(exp(L_a - m) + exp(L_b - m)),   O = exp(L_a - L) O_a + exp(L_b - L) O_b.
This is the second step of split-KV decoding (flash-decoding) and of attention spread over
devices (ring attention). NumPy and CuPy alike: the code is written over the array module.
"""
from __future__ import annotations

import numpy as np

from . import _device
from ._typing import Array

_O_DTYPES = ("float16", "bfloat16", "float32", "float64")
_L_DTYPES = ("float32", "float64")


def merge_attention(O_a: Array, L_a: Array, O_b: Array, L_b: Array) -> tuple[Array, Array]:
    """(O, L) of attention over two disjoint key sets, from each set's attention and logsumexp.

    O_a, O_b: (..., Nq, d) of one float dtype; L_a, L_b: (..., Nq) float32 (or float64), natural
        log, as flash_attention(..., return_lse=True) returns them. All NumPy or all CuPy arrays.
    A row with L = -inf on one side (no key there: O = 0) takes the other side's O and L exactly;
    on both sides it gives O = 0 and L = -inf. NaN stays NaN.

    Computed in float32 (float64 when O or L is float64). Returns O in O_a's dtype and L float32,
    the array type of the inputs. Commutative, and associative up to rounding, so any number of
    parts merges two at a time.
    """
    xp = _array_module(O_a, L_a, O_b, L_b)
    _check_shapes_and_dtypes(O_a, L_a, O_b, L_b)
    out = O_a.dtype
    ct = np.result_type(O_a.dtype, L_a.dtype, L_b.dtype, np.float32)
    O_a, L_a, O_b, L_b = (x.astype(ct, copy=False) for x in (O_a, L_a, O_b, L_b))
    with np.errstate(invalid="ignore"):   # NumPy: inf - inf in a NaN row, which stays NaN
        m = xp.maximum(L_a, L_b)
        m = xp.where(xp.isneginf(m), xp.zeros((), ct), m)   # no key on either side: weights 0
        w_a, w_b = xp.exp(L_a - m), xp.exp(L_b - m)         # one of them is 1 unless both are 0
        s = w_a + w_b
        empty = s == 0
        s = xp.where(empty, xp.ones((), ct), s)
        O = (w_a / s)[..., None] * O_a + (w_b / s)[..., None] * O_b
        L = xp.where(empty, xp.full((), -np.inf, ct), m + xp.log(s))
    return O.astype(out, copy=False), L.astype(np.float32, copy=False)


def _array_module(*arrays):
    names = ("O_a", "L_a", "O_b", "L_b")
    if all(isinstance(x, np.ndarray) for x in arrays):
        return np
    if all(_device.is_cupy_array(x) for x in arrays):
        return _device.cupy()
    got = ", ".join(f"{n} is {type(x).__module__}.{type(x).__qualname__}" for n, x in zip(names, arrays))
    raise TypeError(f"merge_attention takes O_a, L_a, O_b, L_b all NumPy or all CuPy arrays ({got}); "
                    "convert with cupy.asarray(...) or cupy.asnumpy(...)")


def _check_shapes_and_dtypes(O_a, L_a, O_b, L_b) -> None:
    shapes = f"O_a {tuple(O_a.shape)}, L_a {tuple(L_a.shape)}, O_b {tuple(O_b.shape)}, L_b {tuple(L_b.shape)}"
    if O_a.ndim < 2 or O_a.shape != O_b.shape or not L_a.shape == L_b.shape == O_a.shape[:-1]:
        raise ValueError(f"merge_attention takes O_a and O_b of one shape (..., Nq, d) and L_a, L_b of "
                         f"shape (..., Nq), as flash_attention(..., return_lse=True) returns; got {shapes}")
    o_types, l_types = (tuple(np.dtype(x.dtype).name for x in pair) for pair in ((O_a, O_b), (L_a, L_b)))
    if o_types[0] != o_types[1] or o_types[0] not in _O_DTYPES:
        raise TypeError(f"O_a and O_b must have one float dtype of {', '.join(_O_DTYPES)}, got {o_types}")
    if any(t not in _L_DTYPES for t in l_types):
        raise TypeError(f"L_a and L_b must be float32 (or float64) logsumexps, got {l_types}")
