"""A tiny pre-norm transformer decoder layer, forward, in NumPy, with its attention through
flash_attn_func (the C twin), checked against the same layer with naive float64 attention.

    python examples/transformer_layer.py

The fused QKV projection gives (batch, seqlen, 3, heads, d); q, k and v are strided views of it
in flash-attn's (batch, seqlen, heads, d) layout, taken as they are.
"""
import numpy as np

from flashattn_cupy import flash_attn_func

rng = np.random.default_rng(0)
B, N, H, d = 2, 256, 4, 32
D = H * d                                   # model width


def weight(n_in, n_out):
    return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)


w_qkv, w_o, w_up, w_down = weight(D, 3 * D), weight(D, D), weight(D, 4 * D), weight(4 * D, D)


def layer_norm(x, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def naive_attention(q, k, v):
    """Causal softmax(q kᵀ / √d) v on (B, N, H, d), with the N x N scores."""
    S = np.einsum("bihc,bjhc->bhij", q, k) / np.sqrt(d)
    S = np.where(np.triu(np.ones((N, N), dtype=bool), 1), -np.inf, S)
    P = np.exp(S - S.max(-1, keepdims=True))
    return np.einsum("bhij,bjhc->bihc", P / P.sum(-1, keepdims=True), v)


def layer(x, attention):
    """x + attention(LN(x)) W_o, then x + ReLU(LN(x) W_up) W_down; returns (output, attention out)."""
    qkv = (layer_norm(x) @ w_qkv).reshape(B, N, 3, H, d)
    a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])          # (B, N, H, d)
    x = x + a.reshape(B, N, D) @ w_o
    return x + np.maximum(layer_norm(x) @ w_up, 0) @ w_down, a


x = rng.standard_normal((B, N, D)).astype(np.float32)
y, a = layer(x, lambda q, k, v: flash_attn_func(q, k, v, causal=True))
y_ref, a_ref = layer(x.astype(np.float64), naive_attention)           # float64 throughout
print(f"layer: {x.shape} -> {y.shape} {y.dtype}, {H} heads of d = {d}, causal")
print(f"max |attention - naive float64| = {np.abs(a - a_ref).max():.2e}, "
      f"max |layer - naive float64 layer| = {np.abs(y - y_ref).max():.2e}")
