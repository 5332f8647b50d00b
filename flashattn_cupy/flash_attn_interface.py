"""flash_attn_func with flash-attn 2's signature and return convention, so code written for the
flash-attn package ports by changing one import:

    from flashattn_cupy.flash_attn_interface import flash_attn_func   # was: from flash_attn import ...

flash_attn_varlen_func takes the same batch packed without padding (cu_seqlens offsets), and
flash_attn_with_kvcache a KV cache, paged or not, with each batch index's length.

Tensors are (batch, seqlen, nheads, headdim), as in flash-attn. They are read through their
strides: the CUDA kernels take the (batch, nheads, seqlen, headdim) view of them in place (the
C twin copies to contiguous, as it does for every input). Sliding windows, softcap and ALiBi
mean what they mean in flash-attn; dropout (the forward pass is for inference) is refused with a
ValueError before anything runs.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import _device, _interop, rotary
from ._typing import Array, Backend
from .api import flash_attention
from .kvcache import append, flash_attention_kvcache, host_lengths
from .varlen import flash_attention_varlen

def flash_attn_func(q: Array, k: Array, v: Array, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Array | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, return_lse: bool = False,
                    backend: Backend = "auto") -> Any:
    """Attention over (batch, seqlen, nheads, headdim) tensors, as flash_attn.flash_attn_func.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), with
        nheads a multiple of nheads_k (GQA/MQA: query head h reads key/value head
        h // (nheads // nheads_k), as flash_attention does, without repeating k and v).
        Any array flash_attention takes: torch, JAX, CuPy, NumPy, DLPack.
    dropout_p: must be 0.0 (dropout is not supported).
    softmax_scale: defaults to 1 / sqrt(headdim).
    causal: bottom-right aligned mask (key j is masked for query i when j > i + seqlen_k - seqlen_q);
        a query row with every key masked gives zeros.
    window_size: (left, right), sliding-window (local) attention: query i sees key j when
        i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right; -1 is
        unbounded, (-1, -1) no window; with causal=True, right is 0.
    softcap: 0.0 (off), or > 0: scores become softcap * tanh(score / softcap).
    alibi_slopes: None, or (nheads,) or (batch, nheads) slopes (fp32 in flash-attn; any real
        array here): the score of query i and key j loses slope * |i + seqlen_k - seqlen_q - j|.
    deterministic: accepted for compatibility; the forward pass is always deterministic here.
    return_attn_probs: flash-attn's flag: return (out, softmax_lse, None) (no probabilities are
        ever formed, so the third item is None).
    return_lse: return (out, softmax_lse).
    backend: as in flash_attention ("auto", "c", "cuda", "reference").

    Returns out, (batch, seqlen_q, nheads, headdim), contiguous, of q's dtype and kind; and
    softmax_lse, (batch, nheads, seqlen_q) float32, the natural-log logsumexp of the scaled scores.
    """
    window = _check_flash_attn_args(dropout_p, causal, window_size, deterministic, return_attn_probs,
                                    return_lse)
    with _interop.caller_arrays(q, k, v) as (q, k, v, export):
        _check_shapes(q, k, v)
        # (batch, seqlen, heads, d) -> (batch, heads, seqlen, d): views, no copies
        O, L = flash_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), causal=causal,
                               softmax_scale=softmax_scale, window=window, softcap=softcap,
                               alibi_slopes=alibi_slopes, return_lse=True, backend=backend)
        out = export(O.swapaxes(1, 2).copy())   # contiguous (batch, seqlen, heads, d), as flash-attn's
        if return_attn_probs:
            return out, export(L), None
        return (out, export(L)) if return_lse else out


def flash_attn_varlen_func(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Array | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Array | None = None, *,
                           return_lse: bool = False, backend: Backend = "auto") -> Any:
    """Attention over packed variable-length sequences, as flash_attn.flash_attn_varlen_func.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim): the rows of the batch's
        sequences one after another, i.e. the (batch, seqlen, nheads, headdim) tensors of
        flash_attn_func without their padding. nheads a multiple of nheads_k (GQA/MQA).
    cu_seqlens_q, cu_seqlens_k: int32 (or int64) (batch + 1,) offsets of each sequence's rows.
    max_seqlen_q, max_seqlen_k: ints, at least each sequence's length.
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
    return_attn_probs, return_lse, backend: as in flash_attn_func, each sequence on its own.
    block_table: must be None (a paged KV cache is not supported).

    Returns out, (total_q, nheads, headdim), and softmax_lse, (nheads, total_q) float32; see
    flashattn_cupy.flash_attention_varlen for the checks on the offsets.
    """
    window = _check_flash_attn_args(dropout_p, causal, window_size, deterministic, return_attn_probs,
                                    return_lse)
    if block_table is not None:
        raise ValueError("block_table: a paged KV cache is not supported; pass k and v packed as "
                         "(total_k, nheads_k, headdim) with cu_seqlens_k, and block_table=None")
    out, lse = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      causal=causal, softmax_scale=softmax_scale, window=window,
                                      softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True,
                                      backend=backend)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q: Array, k_cache: Array, v_cache: Array, k: Array | None = None,
                            v: Array | None = None, rotary_cos: Array | None = None,
                            rotary_sin: Array | None = None, cache_seqlens: Array | int | None = None,
                            cache_batch_idx: Array | None = None, cache_leftpad: Array | None = None,
                            block_table: Array | None = None, softmax_scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Array | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *,
                            backend: Backend = "auto") -> Any:
    """Attention against a KV cache, as flash_attn.flash_attn_with_kvcache (decoding).

    q: (batch, seqlen_q, nheads, headdim).
    k_cache, v_cache: (batch, seqlen_cache, nheads_k, headdim), or with block_table a paged
        cache (num_blocks, page_block_size, nheads_k, headdim), page_block_size a power of two.
    cache_seqlens: None, an int or an int array (batch,): the keys each batch index sees.
    block_table: None, or int32 (batch, max_num_blocks_per_seq): page numbers.
    softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func, aligned
        with each batch index's cache_seqlens.
    return_softmax_lse: return (out, softmax_lse).
    k, v: None, or the new keys and values (batch, seqlen_new, nheads_k, headdim), the cache's
        dtype: written into the cache in place right after each batch index's cache_seqlens[b]
        keys (through block_table when paged), then attended to with the rest (cache_seqlens
        + seqlen_new keys; causal aligns the queries with the last of them), as flash-attn does.
        cache_seqlens (and a block table) on the GPU are then read on the host to check that the
        new keys fit: one synchronization a call.
    cache_batch_idx: None, or integers (batch,): batch index b reads (and appends to) row
        cache_batch_idx[b] of a contiguous cache. A cache of 2^j keys a row is read in place (as
        a paged cache of one page a row); another length is gathered (a copy), and then cannot
        take k and v (a ValueError).
    rotary_cos, rotary_sin: None, or (seqlen_ro, rotary_dim / 2) each, with k and v only: the new
        keys rotated at positions cache_seqlens[b] + i before they are written, and q at
        cache_seqlens[b] + i with causal or a window, else all of q's rows at cache_seqlens[b]
        (flash-attn's rule); rotary_interleaved: pairs (0, 1), (2, 3), ... (True) or (i, i +
        rotary_dim / 2) (False). flashattn_cupy.rotary has the arithmetic.
    Not supported (a ValueError unless left at their defaults): cache_leftpad, and num_splits
    other than 0 (the planner chooses the split count).

    Returns out, (batch, seqlen_q, nheads, headdim), contiguous; and softmax_lse, (batch,
    nheads, seqlen_q) float32. See flashattn_cupy.flash_attention_kvcache.
    """
    window = _check_flash_attn_args(0.0, causal, window_size, False, False, return_softmax_lse)
    _check_flag("rotary_interleaved", rotary_interleaved)
    if (k is None) != (v is None):
        raise ValueError("pass the new keys and values together (k and v), or neither")
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad is not supported; keep each sequence's keys at the start of its cache, "
                         "and pass cache_leftpad=None")
    if (rotary_cos is not None or rotary_sin is not None) and k is None:
        raise ValueError("rotary_cos and rotary_sin rotate the new keys (k) and q: pass k and v with them")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int, got {num_splits!r}")
    if num_splits != 0:
        raise ValueError(f"num_splits={num_splits}: the planner chooses how the keys are split; pass 0")
    with _interop.caller_arrays(q, k_cache, v_cache) as (q, k_cache, v_cache, export):
        for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if x.ndim != 4:
                raise ValueError(f"flash_attn_with_kvcache takes {name} with 4 dims (batch or blocks, seqlen, "
                                 f"nheads, headdim), got shape {tuple(x.shape)}")
        if cache_batch_idx is not None:
            block_table, k_cache, v_cache = _batch_rows(cache_batch_idx, block_table, q.shape[0], k_cache, v_cache,
                                                        k is not None)
        # (batch, seqlen, heads, d) -> (batch, heads, seqlen, d): views, no copies
        if k is not None:
            k, v = (_interop.small_array(name, x, "an array like k_cache") for name, x in (("k", k), ("v", v)))
            lengths, host = host_lengths(cache_seqlens, q.shape[0])   # read once, for both below
            if rotary_cos is not None or rotary_sin is not None:
                q, k = _rotate(q, k, rotary_cos, rotary_sin, host, causal or window != (-1, -1), rotary_interleaved)
            cache_seqlens = append(q.swapaxes(1, 2), k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2),
                                   k.swapaxes(1, 2), v.swapaxes(1, 2), lengths, host, block_table)
        O, L = flash_attention_kvcache(q.swapaxes(1, 2), k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2),
                                       cache_seqlens=cache_seqlens, block_table=block_table, causal=causal,
                                       softmax_scale=softmax_scale, window=window, softcap=softcap,
                                       alibi_slopes=alibi_slopes, return_lse=True, backend=backend)
        out = export(O.swapaxes(1, 2).copy())   # contiguous (batch, seqlen, heads, d), as flash-attn's
        return (out, export(L)) if return_softmax_lse else out


def _rotate(q, k, cos, sin, host, local: bool, interleaved: bool):
    """q and k with rotary embeddings at flash-attn's positions (see flash_attn_with_kvcache),
    host: the cache lengths on the host."""
    cos, sin = rotary.tables(cos, sin, k.shape[-1], _device.is_cupy_array(k))
    nq, n = q.shape[1], k.shape[1]
    q_at = host[:, None] + (np.arange(nq) if local else np.zeros(nq, np.int64))
    return (rotary.rotate(q, cos, sin, q_at, interleaved),
            rotary.rotate(k, cos, sin, host[:, None] + np.arange(n), interleaved))


def _batch_rows(cache_batch_idx, block_table, batch: int, k_cache, v_cache, appending: bool):
    """(block_table, k_cache, v_cache) that read row cache_batch_idx[b] of a contiguous cache for
    batch index b: the cache itself as pages of one row each where a row's length is a power of
    two (in place), else the rows gathered (a copy, which new keys could not be written through)."""
    if block_table is not None:
        raise ValueError("cache_batch_idx picks rows of a contiguous cache and block_table pages of a paged "
                         "one: pass one of them")
    idx = _interop.small_array("cache_batch_idx", cache_batch_idx, "an integer array (batch,)")
    if tuple(idx.shape) != (batch,) or np.dtype(idx.dtype).kind not in "iu":
        raise ValueError(f"cache_batch_idx must be integers of shape ({batch},), got {tuple(idx.shape)} of "
                         f"{np.dtype(idx.dtype)}")
    if _device.is_cupy_array(idx) and not _device.is_cupy_array(k_cache):
        raise TypeError("cache_batch_idx is a CuPy array and k_cache a NumPy one: pass a NumPy cache_batch_idx")
    rows = k_cache.shape[0]
    if isinstance(idx, np.ndarray) and (idx.min() < 0 or idx.max() >= rows):
        raise ValueError(f"cache_batch_idx must lie in [0, {rows - 1}] (rows of k_cache), got values from "
                         f"{idx.min()} to {idx.max()}")
    length = k_cache.shape[1]
    if length & (length - 1) == 0:
        return idx.reshape(batch, 1), k_cache, v_cache
    if appending:
        raise ValueError(f"k and v cannot be appended through cache_batch_idx to rows of {length} keys (dim 1 of "
                         "k_cache; a power of two is read in place): allocate the cache with a power-of-two "
                         "length, or write the new keys yourself and pass cache_seqlens")
    return None, k_cache[idx], v_cache[idx]


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_zero(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value != 0:
        raise ValueError(f"{name}={value!r}: {what}")


def _check_flash_attn_args(dropout_p, causal, window_size, deterministic, return_attn_probs,
                           return_lse) -> tuple[int, int]:
    """The arguments flash-attn has beyond flash_attention's (softcap and alibi_slopes are
    flash_attention's own, checked there); returns the window as flash_attention takes it."""
    _check_zero("dropout_p", dropout_p,
                "dropout is not supported (flashattn_cupy computes the forward pass for inference); "
                "pass dropout_p=0.0, e.g. `dropout_p if self.training else 0.0` in a model at eval")
    _check_flag("causal", causal)
    for name, flag in (("deterministic", deterministic), ("return_attn_probs", return_attn_probs),
                       ("return_lse", return_lse)):
        _check_flag(name, flag)
    if return_attn_probs and return_lse:
        raise ValueError("pass return_attn_probs=True (flash-attn's (out, lse, None)) or "
                         "return_lse=True ((out, lse)), not both")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size={tuple(window_size)!r}: each side must be >= 0 (keys seen on that "
                         "side of the diagonal) or -1 (unbounded)")
    return int(window_size[0]), int(window_size[1])


def _check_shapes(q, k, v) -> None:
    """flash-attn's shape rules, in its words (flash_attention checks them again, as (..., N, d))."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"flash_attn_func takes {name} of shape (batch, seqlen, nheads, headdim), "
                             f"got shape {tuple(x.shape)}; flash_attention takes (..., seqlen, headdim)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (batch, seqlen_k, nheads_k, headdim), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"nheads of q ({heads}) must be a multiple of nheads of k and v ({kv_heads})")
