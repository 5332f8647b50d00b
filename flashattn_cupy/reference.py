"""The float64 oracle: naive softmax(scale * Q K^T) V on NumPy, materializing Nq x Nk.

Every test compares against this. It is deliberately the textbook formula, sharing no code
with the kernels: scores, the score mods (softcap, ALiBi), the same bottom-right causal mask
and sliding window, max-subtracted exp, row sums.
"""
from __future__ import annotations

import numpy as np


def causal_mask(Nq: int, Nk: int) -> np.ndarray:
    """True where key j is masked for query i: j > i + (Nk - Nq) (bottom-right aligned)."""
    i = np.arange(Nq)[:, None]
    j = np.arange(Nk)[None, :]
    return j > i + (Nk - Nq)


def offsets(Nq: int, Nk: int) -> np.ndarray:
    """(Nq, Nk) int: i + (Nk - Nq) - j, how far key j lies left of query i's causal diagonal."""
    return np.arange(Nq)[:, None] + (Nk - Nq) - np.arange(Nk)[None, :]


def window_mask(Nq: int, Nk: int, window) -> np.ndarray:
    """True where key j is outside query i's sliding window (left, right) (-1: unbounded side):
    i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right is seen (bottom-right aligned)."""
    left, right = window
    off, masked = offsets(Nq, Nk), np.zeros((Nq, Nk), bool)
    if left >= 0:
        masked |= off > left
    if right >= 0:
        masked |= -off > right
    return masked


def grouped(q, k, v):
    """q, k, v as broadcastable arrays: with k and v holding fewer heads (dim -3) than q (GQA/MQA,
    query head h reads key/value head h // group), q (..., Hkv * group, Nq, d) is viewed as
    (..., Hkv, group, Nq, d) and k, v as (..., Hkv, 1, Nk, d). Otherwise unchanged."""
    if q.ndim < 3 or q.shape[-3] == k.shape[-3]:
        return q, k, v
    kv_heads = k.shape[-3]
    q = q.reshape(q.shape[:-3] + (kv_heads, q.shape[-3] // kv_heads) + q.shape[-2:])
    return q, k[..., None, :, :], v[..., None, :, :]


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None, window=None,
              softcap: float = 0.0, alibi_slopes=None):
    """(O, L) in float64 for NumPy inputs of shape (..., N, d) of any float dtype; k and v may
    have fewer heads than q (see grouped).

    The score of query i and key j is x = scale * q_i . k_j, then softcap * tanh(x / softcap)
    when softcap > 0, then minus slope * |i + (Nk - Nq) - j| with alibi_slopes (one slope per
    (batch..., head): any shape that broadcasts to q.shape[:-2]). Keys outside the window
    (left, right) (-1: unbounded; see window_mask), or past the causal diagonal, are masked.
    L is the natural-log logsumexp of the scores. A row with every key masked (or every
    score -inf) gives O = 0 and L = -inf. Otherwise NaN and inf go through IEEE arithmetic:
    a NaN or +inf score makes the row's O and L NaN, and 0 * inf or 0 * NaN in P V is NaN.
    """
    shape = np.shape(q)
    q, k, v = grouped(*(np.asarray(x).astype(np.float64) for x in (q, k, v)))
    d, Nq, Nk = q.shape[-1], q.shape[-2], k.shape[-2]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):   # inf - inf, 0 * inf: NaN, as said
        S = scale * (q @ np.swapaxes(k, -1, -2))
        if softcap > 0:
            S = softcap * np.tanh(S / softcap)
        if alibi_slopes is not None:
            slopes = np.asarray(alibi_slopes, np.float64)
            if not shape[:-2]:   # q (N, d): one head, its slope given as (1,) or ()
                slopes = slopes.reshape(())
            slopes = np.broadcast_to(slopes, shape[:-2])
            S = S - slopes.reshape(q.shape[:-2] + (1, 1)) * np.abs(offsets(Nq, Nk))
        masked = causal_mask(Nq, Nk) if causal else np.zeros((Nq, Nk), bool)
        if window is not None:
            masked = masked | window_mask(Nq, Nk, window)
        S = np.where(masked, -np.inf, S)
        m = S.max(axis=-1, keepdims=True)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        P = np.exp(S - m_safe)
        l = P.sum(axis=-1, keepdims=True)
        empty = l == 0   # no key to attend to; a NaN l is not empty and stays NaN
        O = np.where(empty, 0.0, (P @ v) / l)
        L = np.where(empty, -np.inf, m_safe + np.log(l))[..., 0]
    return O.reshape(shape), L.reshape(shape[:-1])
