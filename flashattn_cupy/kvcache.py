"""flash_attention_kvcache: attention against a KV cache, each batch index with its own number of
keys, the cache optionally paged (a block table, as vLLM and flash-attn's flash_attn_with_kvcache
keep it).

The CUDA path for decoding shapes (fp16/bf16 on sm_80+, group * Nq <= 16 rows a k/v head) is
split-KV decoding (csrc/flash_decode.cu) reading the lengths and the pages on the GPU: no copy,
no host synchronization, one plan for every step of a decoding loop. Every other call (float32,
more query rows, the C twin, the reference) reads the lengths on the host, gathers each batch
index's keys into one array and calls flash_attention on it, once per batch index.
"""
from __future__ import annotations

import numbers
from typing import Any, cast

import numpy as np

from . import _device, _interop, planner
from ._typing import Array, Backend
from ._validate import _INT32_MAX, Problem, validate


def flash_attention_kvcache(q: Array, k_cache: Array, v_cache: Array, *, cache_seqlens: Array | int | None = None,
                            block_table: Array | None = None, causal: bool = False,
                            softmax_scale: float | None = None, window: tuple[int, int] | None = None,
                            softcap: float = 0.0, alibi_slopes: Array | None = None, return_lse: bool = False,
                            backend: Backend = "auto") -> Any:
    """Attention of q against a KV cache: batch index b sees the first cache_seqlens[b] keys.

    q: (batch, heads, Nq, d).
    k_cache, v_cache: (batch, kv_heads, Ncache, d); or, with block_table, a paged cache
        (num_pages, kv_heads, page, d), page a power of two (16, 256, ...). Any strides with a
        contiguous last dim (flash-attn's (num_pages, page, kv_heads, d) is
        k_cache.transpose(0, 2, 1, 3)). kv_heads divides heads (GQA/MQA).
    cache_seqlens: None (every key: Ncache, or pages_per_seq * page), an int, or an integer
        array (batch,): the keys of batch b are its first cache_seqlens[b] (0 gives O = 0 and
        L = -inf). causal and window align with them: query i sits at key
        cache_seqlens[b] - Nq + i, as in flash-attn.
    block_table: None, or an integer array (batch, pages_per_seq): key j of batch b is row
        j % page of page block_table[b, j // page]. Entries past a sequence's last page are
        not read (nor checked, where the lengths are given on the host: -1 padding is fine).
    causal, softmax_scale, window, softcap, alibi_slopes, return_lse, backend: as in
        flash_attention.

    Lengths and page numbers given on the host are checked there (0 <= cache_seqlens[b] <=
    capacity, 0 <= block_table < num_pages); on the GPU they are not read back: a length out of
    range is clamped into [0, capacity] by the kernel, a page number out of range reads memory
    that is not the cache's. Returns O (batch, heads, Nq, d) like q, and with return_lse L
    (batch, heads, Nq) float32.
    """
    key = _call_key(q, k_cache, v_cache, cache_seqlens, block_table,
                    (causal, softmax_scale, window, softcap, alibi_slopes, backend), return_lse)
    try:
        call = _CALLS.get(key) if key is not None else None
    except TypeError:   # an unhashable option: not kept
        key = call = None
    if call is not None:   # a decoding loop's next step: the same launches on these arrays
        with _device.cupy().cuda.Device(call.device_id):
            O, L = call.launch(_device.cupy(), q, k_cache, v_cache, cache_seqlens, block_table)
        return (O, L) if return_lse else O
    with _interop.caller_arrays(q, k_cache, v_cache) as (q, k_cache, v_cache, export):
        cache = _validate(q, k_cache, v_cache, cache_seqlens, block_table, causal=causal,
                          softmax_scale=softmax_scale, window=window, softcap=softcap,
                          alibi_slopes=alibi_slopes, return_lse=return_lse, backend=backend)
        O, L, call = _run(cache)
        if key is not None and call is not None:
            if len(_CALLS) >= _CALLS_MAX:   # a bound, for programs whose shapes never repeat
                _CALLS.clear()
            _CALLS[key] = call
        return (export(O), export(L)) if return_lse else export(O)


# Decoding calls on CuPy arrays, by _call_key: a decoding loop makes the same call step after
# step (the same cache arrays and int32 lengths array, new values in it), and the kept Call
# launches again without validating or planning: ~20 µs of host time a step instead of ~150,
# which at B = 1 is more than the GPU's time (BENCHMARKS.md). The lengths and page numbers are
# read by the kernel only, so new values in the same arrays need nothing re-checked.
_CALLS: dict = {}
_CALLS_MAX = 256


def _call_key(q, k_cache, v_cache, cache_seqlens, block_table, options: tuple, return_lse):
    """What validation and planning read of a call, as a dict key; None where a call is not kept:
    arrays other than CuPy's (q, k_cache, v_cache; the lengths and block table as int32,
    C-contiguous CuPy arrays, or None), ALiBi slopes (their values are checked), a window other
    than a tuple of ints, return_lse not a bool."""
    ndarray = _device.ndarray_type()
    if ndarray is None or any(type(x) is not ndarray for x in (q, k_cache, v_cache)) \
            or options[4] is not None or (return_lse is not True and return_lse is not False):
        return None
    from .api import plain_window
    if not plain_window(options[2]):
        return None
    index = []
    for x, ndim in ((cache_seqlens, 1), (block_table, 2)):
        if x is not None and (type(x) is not ndarray or x.dtype != np.int32 or x.ndim != ndim
                              or not x.flags.c_contiguous):
            return None
        index.append(None if x is None else (x.shape, x.data.device_id))
    return (*((x.shape, x.strides, x.dtype, x.data.device_id) for x in (q, k_cache, v_cache)), *index,
            options, tuple(map(type, options)))


class _Cache:
    """A validated call: flash_attention's Problem over the cache's keys (k and v stand-ins of
    shape (batch, kv_heads, capacity, d)) and where those keys are."""

    def __init__(self, problem: Problem, k_cache, v_cache, seqlens, table, page: int | None):
        self.problem, self.k_cache, self.v_cache = problem, k_cache, v_cache
        self.seqlens = seqlens   # None (all capacity keys), or int (batch,) on the arrays' side
        self.table = table       # None, or int32 (batch, pages_per_seq) on the arrays' side
        self.page = page         # keys a page, None when not paged


def _index_array(name: str, x, shape: tuple, xp, on_gpu: bool, high: int, high_name: str, read=None):
    """An integer array argument as int32 of this shape, on the arrays' side (xp); host values
    checked to lie in [0, high], of a 2-D one only the first read[b] of row b when read is given
    (the entries the kernels read)."""
    x = _interop.small_array(name, x, "an integer array (NumPy, CuPy, torch, a list)")
    if np.dtype(x.dtype).kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {np.dtype(x.dtype)}: cast with .astype(int32)")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if _device.is_cupy_array(x):
        if not on_gpu:
            raise TypeError(f"{name} is a CuPy array and q, k_cache, v_cache are NumPy arrays; pass a NumPy "
                            f"{name}, or CuPy q, k_cache, v_cache")
    else:
        used = x if read is None else x[np.arange(shape[1]) < np.asarray(read)[:, None]]
        if used.size and (used.min() < 0 or used.max() > high):
            raise ValueError(f"{name} must lie in [0, {high}] ({high_name}), got values from {used.min()} "
                             f"to {used.max()}")
    return xp.ascontiguousarray(xp.asarray(x, dtype=np.int32))


def _validate(q, k_cache, v_cache, cache_seqlens, block_table, *, backend, **options) -> _Cache:
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have 4 dims: q (batch, heads, Nq, d), k_cache and v_cache (batch, "
                             f"kv_heads, Ncache, d) or, paged, (num_pages, kv_heads, page, d); got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch, page = q.shape[0], None
    kinds = {isinstance(x, np.ndarray) for x in (q, k_cache, v_cache)}
    on_gpu = kinds == {False} and _device.is_cupy_array(q)
    xp = _device.cupy() if on_gpu else np
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache and v_cache must have q's batch ({batch}) as dim 0 (or pass block_table "
                             f"for a paged cache), got shape {tuple(k_cache.shape)}")
        capacity = k_cache.shape[2]
        keys = k_cache, v_cache
    else:
        num_pages, page = k_cache.shape[0], k_cache.shape[2]
        if page & (page - 1):
            raise ValueError(f"the page size (dim 2 of a paged k_cache, {page}) must be a power of two")
        pages_per_seq = getattr(block_table, "shape", (None, None))[-1]
        if not isinstance(pages_per_seq, numbers.Integral):
            pages_per_seq = len(block_table[0]) if isinstance(block_table, (list, tuple)) and block_table else 0
        if not 1 <= pages_per_seq * page <= _INT32_MAX:
            raise ValueError(f"block_table must have shape (batch, pages_per_seq) with pages_per_seq * page "
                             f"between 1 and 2**31 - 1, got pages_per_seq {pages_per_seq}, page {page}")
        capacity = pages_per_seq * page
        # flash_attention's checks of the keys see (batch, kv_heads, capacity, d) stand-ins: one
        # page row repeated (zero strides; never read).
        keys = tuple((_device.cupy() if _device.is_cupy_array(x) else np).broadcast_to(
            x[:1, :, :1], (batch, x.shape[1], capacity, x.shape[3])) for x in (k_cache, v_cache))
    problem = validate(q, *keys, backend=backend, **options)
    seqlens = table = None
    read = None   # page numbers each sequence's keys reach, where its length is known on the host
    if cache_seqlens is not None:
        if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, (bool, np.bool_)):
            length = int(cache_seqlens)
            if not 0 <= length <= capacity:
                raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (keys the cache holds), got {length}")
            cache_seqlens = np.full(batch, length)
        seqlens = _index_array("cache_seqlens", cache_seqlens, (batch,), xp, on_gpu, capacity,
                               "keys the cache holds")
        if page and isinstance(cache_seqlens, (np.ndarray, list, tuple)):
            read = -(-np.asarray(cache_seqlens, np.int64) // page)
    if block_table is not None:
        table = _index_array("block_table", block_table, (batch, capacity // page), xp, on_gpu,
                             num_pages - 1, "page numbers of k_cache", read)
    if on_gpu:
        for name, x in (("block_table", table), ("cache_seqlens", seqlens)):
            if x is not None and x.device.id != q.device.id:
                raise ValueError(f"{name} is on GPU {x.device.id} and q on GPU {q.device.id}; copy it there")
    return _Cache(problem, k_cache, v_cache, seqlens, table, page)


def host_lengths(cache_seqlens, batch: int):
    """(lengths, host): cache_seqlens as an array of its own kind (an int: NumPy), and its values
    on the host (a GPU array is read back: a synchronization), for appending new keys."""
    if cache_seqlens is None:
        raise ValueError("appending k and v needs cache_seqlens: each batch index's new keys go right after "
                         "its first cache_seqlens[b] keys")
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, (bool, np.bool_)):
        lengths = np.full(batch, int(cache_seqlens))
    else:
        lengths = _interop.small_array("cache_seqlens", cache_seqlens, "an int or an integer array")
        if tuple(lengths.shape) != (batch,) or np.dtype(lengths.dtype).kind not in "iu":
            raise ValueError(f"cache_seqlens must be an int or integers of shape ({batch},), got "
                             f"{tuple(lengths.shape)} of {np.dtype(lengths.dtype)}")
    return lengths, (lengths if isinstance(lengths, np.ndarray) else lengths.get())


def append(q, k_cache, v_cache, k, v, lengths, host, block_table):
    """Writes k and v, (batch, kv_heads, n, d), into the cache in place right after each batch
    index's lengths[b] keys (rows lengths[b] .. + n - 1, through block_table when paged), and
    returns the lengths that count them, lengths + n, of lengths' kind (flash-attn's
    flash_attn_with_kvcache with k and v). lengths and host: host_lengths' pair; the host values
    are checked to leave room for the new keys, and a GPU block table is read back to check the
    pages they go to."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(getattr(x, 'shape', ()))}")
    on_gpu = _device.is_cupy_array(k_cache)
    for name, x in (("k", k), ("v", v)):
        if _device.is_cupy_array(x) != on_gpu or not (on_gpu or isinstance(x, np.ndarray)):
            raise TypeError(f"{name} must be the cache's kind of array ({'CuPy' if on_gpu else 'NumPy'}), "
                            f"got {type(x).__module__}.{type(x).__name__}")
        if x.dtype != k_cache.dtype:
            raise TypeError(f"{name} must have the cache's dtype {k_cache.dtype}, got {x.dtype}: cast it first")
    batch, kv_heads, n, d = k.shape
    if (batch != q.shape[0] or (kv_heads, d) != (k_cache.shape[1], k_cache.shape[3]) or n < 1
            or tuple(v.shape) != tuple(k.shape)):
        raise ValueError(f"k and v must both have shape (batch {q.shape[0]}, seqlen_new >= 1, kv_heads "
                         f"{k_cache.shape[1]}, headdim {k_cache.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
    xp = _device.cupy() if on_gpu else np
    page = None if block_table is None else k_cache.shape[2]
    if block_table is None:
        capacity = k_cache.shape[2]
    else:
        table = _interop.small_array("block_table", block_table, "an integer array (NumPy, CuPy, torch, a list)")
        table = table if isinstance(table, np.ndarray) else table.get()
        if table.ndim != 2 or table.shape[0] != batch or np.dtype(table.dtype).kind not in "iu":
            raise ValueError(f"block_table must be integers of shape ({batch}, pages_per_seq), got "
                             f"{tuple(table.shape)} of {np.dtype(table.dtype)}")
        capacity = table.shape[1] * page
    if host.min() < 0 or host.max() + n > capacity:
        raise ValueError(f"the {n} new keys must fit in the cache: cache_seqlens + {n} <= {capacity} (keys it "
                         f"holds), got cache_seqlens from {host.min()} to {host.max()}")
    rows = host[:, None].astype(np.int64) + np.arange(n)   # (batch, n): where the new keys go
    index = np.arange(batch)[:, None]
    if page is not None:   # through the pages those rows lie in
        index, rows = table[index, rows // page], rows % page
        if index.min() < 0 or index.max() >= k_cache.shape[0]:
            raise ValueError(f"block_table's pages for the new keys must lie in [0, {k_cache.shape[0] - 1}] "
                             f"(page numbers of k_cache), got values from {index.min()} to {index.max()}")
    index, rows = xp.asarray(index), xp.asarray(rows)
    for cache, new in ((k_cache, k), (v_cache, v)):   # in (batch or page, row, kv_heads, d) order: two
        cache.swapaxes(1, 2)[index, rows] = new.swapaxes(1, 2)   # adjacent index arrays, (batch, n) each
    return lengths + n


def _decoding_plan(cache: _Cache):
    """The split-KV decoding plan that reads the cache in place, or None where the call needs
    another kernel (not fp16/bf16 on sm_80+, more than 16 rows a k/v head, no tile that fits)."""
    p = cache.problem
    if p.backend != "cuda":
        return None
    from . import api
    device_id = api._device_id(p)
    arch, smem_limit = _device.compute_capability(device_id), _device.smem_limit(device_id)
    page = cache.page or 0
    if planner.decode_fits(p.Nq, p.group, p.dtype, arch, planner.head_dim_bound(p.d), smem_limit, page) is None:
        return None
    return api._plan(p, device_id, decode=True, page=page)


def _run(cache: _Cache):
    """(O, L, call): call, the decoding launch's Call where kvcache may keep it, else None."""
    plan = _decoding_plan(cache)
    if plan is not None:
        from . import _cuda_backend, api
        return _cuda_backend.run_kvcache(cache, plan, api._device_id(cache.problem))
    return (*_per_batch(cache), None)


def _per_batch(cache: _Cache):
    """flash_attention once per batch index on its keys, gathered from the cache (its lengths
    read on the host)."""
    from .api import flash_attention
    p = cache.problem
    xp = _device.cupy() if p.on_gpu else np
    host = lambda x: x if isinstance(x, np.ndarray) else x.get()  # noqa: E731
    lengths = [p.Nk] * p.batch if cache.seqlens is None else host(cache.seqlens).tolist()
    table = None if cache.table is None else host(cache.table)
    q = p.q
    alibi = p.alibi if p.alibi is None or p.on_gpu else host(p.alibi)   # the cuda backend's are on the GPU
    B, H, Nq, d = q.shape
    O = xp.zeros(q.shape, dtype=q.dtype)
    L = xp.full((B, H, Nq), -np.inf, dtype=np.float32)   # a batch index without keys keeps O = 0, L = -inf
    for b, n in enumerate(lengths):
        n = min(max(n, 0), p.Nk)   # as the kernel clamps a GPU length
        if n == 0:
            continue
        if table is None:
            k, v = cache.k_cache[b, :, :n], cache.v_cache[b, :, :n]
        else:
            pages = xp.asarray(table[b, :-(-n // cache.page)])   # (pages, kv_heads, page, d) -> (kv_heads, keys, d)
            k, v = (x[pages].swapaxes(0, 1).reshape(H // p.group, -1, d)[:, :n] for x in (cache.k_cache, cache.v_cache))
        slopes = None if alibi is None else alibi[b]
        O[b], L[b] = flash_attention(q[b], k, v, causal=p.causal, softmax_scale=p.scale, window=p.window,
                                     softcap=p.softcap, alibi_slopes=slopes, return_lse=True,
                                     backend=cast(Backend, p.backend))
    return O, L
