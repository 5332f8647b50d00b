"""The float64 oracle: naive softmax(scale * Q K^T) V on NumPy, materializing Nq x Nk.

Every test compares against this. It is deliberately the textbook formula, sharing no code
with the kernels: scores, the same bottom-right causal mask, max-subtracted exp, row sums.
"""
from __future__ import annotations

import numpy as np


def causal_mask(Nq: int, Nk: int) -> np.ndarray:
    """True where key j is masked for query i: j > i + (Nk - Nq) (bottom-right aligned)."""
    i = np.arange(Nq)[:, None]
    j = np.arange(Nk)[None, :]
    return j > i + (Nk - Nq)


def grouped(q, k, v):
    """q, k, v as broadcastable arrays: with k and v holding fewer heads (dim -3) than q (GQA/MQA,
    query head h reads key/value head h // group), q (..., Hkv * group, Nq, d) is viewed as
    (..., Hkv, group, Nq, d) and k, v as (..., Hkv, 1, Nk, d). Otherwise unchanged."""
    if q.ndim < 3 or q.shape[-3] == k.shape[-3]:
        return q, k, v
    kv_heads = k.shape[-3]
    q = q.reshape(q.shape[:-3] + (kv_heads, q.shape[-3] // kv_heads) + q.shape[-2:])
    return q, k[..., None, :, :], v[..., None, :, :]


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None):
    """(O, L) in float64 for NumPy inputs of shape (..., N, d) of any float dtype; k and v may
    have fewer heads than q (see grouped).

    L is the natural-log logsumexp of the scaled scores. A row with every key masked (or every
    score -inf) gives O = 0 and L = -inf. Otherwise NaN and inf go through IEEE arithmetic:
    a NaN or +inf score makes the row's O and L NaN, and 0 * inf or 0 * NaN in P V is NaN.
    """
    shape = np.shape(q)
    q, k, v = grouped(*(np.asarray(x).astype(np.float64) for x in (q, k, v)))
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    with np.errstate(divide="ignore", invalid="ignore"):   # inf - inf, 0 * inf: NaN, as said
        S = scale * (q @ np.swapaxes(k, -1, -2))
        if causal:
            S = np.where(causal_mask(q.shape[-2], k.shape[-2]), -np.inf, S)
        m = S.max(axis=-1, keepdims=True)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        P = np.exp(S - m_safe)
        l = P.sum(axis=-1, keepdims=True)
        empty = l == 0   # no key to attend to; a NaN l is not empty and stays NaN
        O = np.where(empty, 0.0, (P @ v) / l)
        L = np.where(empty, -np.inf, m_safe + np.log(l))[..., 0]
    return O.reshape(shape), L.reshape(shape[:-1])
