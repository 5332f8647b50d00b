"""flash_attention_kvcache and flash_attn_with_kvcache: a KV cache with a length per batch index,
contiguous or paged (a block table).

The oracle gathers each batch index's keys row by row from the cache (key j of batch b: page
block_table[b, j // page], row j % page) and runs the float64 reference on them. On CUDA the
decoding kernel reads the pages in place; a paged cache and a contiguous one holding the same
keys must then give the same bits (same plan, same arithmetic, only the addresses differ).
"""
import contextlib
import dataclasses

import numpy as np
import pytest

import kernel_model
from backends import np_dtype
from flashattn_cupy import (_cuda_backend, _device, planner, flash_attention, flash_attention_kvcache, flash_attn_with_kvcache, kvcache,
                            plan_for)
from tolerances import assert_attention_close, kernel_rounding


def _cache(rng, lengths, *, H=4, Hk=2, Nq=1, d=40, page=None, capacity=96, dtype="float32", spare=3):
    """q (B, H, Nq, d), k_cache, v_cache and block_table (None when page is None: a contiguous
    (B, Hk, capacity, d) cache). A paged cache holds B * capacity / page pages and `spare` more,
    dealt to the batch indices in a shuffled order (pages of one sequence are not adjacent)."""
    B, t = len(lengths), np_dtype(dtype)
    q = rng.standard_normal((B, H, Nq, d)).astype(t)
    if page is None:
        k, v = (rng.standard_normal((B, Hk, capacity, d)).astype(t) for _ in range(2))
        return q, k, v, None
    per_seq = capacity // page
    pages = B * per_seq + spare
    k, v = (rng.standard_normal((pages, Hk, page, d)).astype(t) for _ in range(2))
    table = rng.permutation(pages)[:B * per_seq].reshape(B, per_seq).astype(np.int32)
    return q, k, v, table


def _keys(k_cache, table, b, n, page):
    """Batch b's first n keys, (Hk, n, d), gathered one row at a time."""
    if table is None:
        return k_cache[b, :, :n]
    return np.stack([k_cache[table[b, j // page], :, j % page] for j in range(n)], axis=1)


def _check(O, L, q, k, v, table, lengths, page, rounding, **kw):
    """Every batch index against the float64 reference on its gathered keys."""
    slopes = kw.pop("alibi_slopes", None)
    for b, n in enumerate(lengths):
        if n == 0:
            assert (O[b] == 0).all() and np.isneginf(L[b]).all()
            continue
        per_b = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        assert_attention_close(O[b], L[b], q[b], _keys(k, table, b, n, page), _keys(v, table, b, n, page),
                               alibi_slopes=per_b, **rounding, **kw)


# lengths: an empty sequence, ragged ones (a partial last page and tile), a full cache
LENGTHS = [0, 37, 96, 1, 64]
OPTIONS = [dict(), dict(causal=True), dict(window=(5, 0)), dict(softcap=3.0, alibi="batch"),
           dict(causal=True, alibi="heads", softmax_scale=-0.2)]


def _decoding_plan(q, k, v, seqlens, table, **kw):
    """The decoding plan flash_attention_kvcache runs for these CuPy arguments (None: none)."""
    options = {"causal": False, "softmax_scale": None, "window": None, "softcap": 0.0, "alibi_slopes": None, **kw}
    return kvcache._decoding_plan(kvcache._validate(q, k, v, seqlens, table, backend="auto", return_lse=True,
                                                    **options))


def _options(rng, options, B, H):
    alibi = options.get("alibi")
    slopes = None if alibi is None else rng.uniform(0, 1, (H,) if alibi == "heads" else (B, H)).astype(np.float32)
    return {**{key: value for key, value in options.items() if key != "alibi"}, "alibi_slopes": slopes}


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("page", [None, 1, 16, 32])
@pytest.mark.parametrize("Nq", [1, 6])
def test_c_matches_the_reference(rng, options, page, Nq):
    q, k, v, table = _cache(rng, LENGTHS, page=page, Nq=Nq)
    kw = _options(rng, options, len(LENGTHS), 4)
    O, L = flash_attention_kvcache(q, k, v, cache_seqlens=np.array(LENGTHS, np.int32), block_table=table,
                                   return_lse=True, **kw)
    assert O.shape == q.shape and O.dtype == q.dtype and L.shape == q.shape[:-1] and L.dtype == np.float32
    _check(O, L, q, k, v, table, LENGTHS, page, {}, **kw)


def test_every_key_by_default_an_int_length_and_the_reference_backend(rng):
    """cache_seqlens=None is the whole cache (flash_attention on it, bitwise on the C twin); an
    int is that length for every batch index; backend="reference" takes the same path."""
    q, k, v, table = _cache(rng, [96, 96], page=16)
    whole = np.concatenate([k[table[:, i]] for i in range(table.shape[1])], axis=2)   # (B, Hk, 96, d)
    values = np.concatenate([v[table[:, i]] for i in range(table.shape[1])], axis=2)
    O = flash_attention_kvcache(q, k, v, block_table=table, causal=True)
    np.testing.assert_array_equal(O, flash_attention(q, whole, values, causal=True))
    O_int = flash_attention_kvcache(q, k, v, cache_seqlens=40, block_table=table)
    np.testing.assert_array_equal(O_int, flash_attention_kvcache(q, k, v, cache_seqlens=[40, 40], block_table=table))
    O_ref, L_ref = flash_attention_kvcache(q, k, v, cache_seqlens=[40, 7], block_table=table, backend="reference",
                                           return_lse=True)
    _check(O_ref, L_ref, q, k, v, table, [40, 7], 16, {"compute": "float64"})


def test_table_entries_past_a_sequence_are_not_read(rng):
    """-1 (or any value) past the pages a sequence's host-given length reaches: accepted, and the
    same result; within them, refused."""
    q, k, v, table = _cache(rng, [40, 96], page=16)
    padded = table.copy()
    padded[0, 3:] = -1   # 40 keys: pages 0..2
    O = flash_attention_kvcache(q, k, v, cache_seqlens=[40, 96], block_table=table)
    np.testing.assert_array_equal(flash_attention_kvcache(q, k, v, cache_seqlens=[40, 96], block_table=padded), O)
    with pytest.raises(ValueError, match="block_table must lie in"):
        flash_attention_kvcache(q, k, v, cache_seqlens=[49, 96], block_table=padded)


def test_flash_attn_with_kvcache_is_flash_attention_kvcache(rng):
    """flash-attn's layout (batch or pages, seqlen, heads, d) is the transpose of ours: the same
    bits, out contiguous; the arguments it has and we do not are refused."""
    q, k, v, table = _cache(rng, [50, 3], page=16, Nq=2)
    slopes = rng.uniform(0, 1, 4).astype(np.float32)
    O, L = flash_attention_kvcache(q, k, v, cache_seqlens=[50, 3], block_table=table, causal=True,
                                   window=(9, 0), softcap=4.0, alibi_slopes=slopes, return_lse=True)
    flip = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    out, lse = flash_attn_with_kvcache(flip(q), flip(k), flip(v), cache_seqlens=np.array([50, 3], np.int32),
                                       block_table=table, causal=True, window_size=(9, 4), softcap=4.0,
                                       alibi_slopes=slopes, return_softmax_lse=True)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, flip(O))
    np.testing.assert_array_equal(lse, L)
    for name, value, match in (("k", flip(q), "k and v"), ("rotary_cos", q, "pass k and v with them"),
                               ("cache_leftpad", [0, 0], "cache_leftpad is not"), ("num_splits", 2, "num_splits=2")):
        with pytest.raises(ValueError, match=match):
            flash_attn_with_kvcache(flip(q), flip(k), flip(v), block_table=table, **{name: value})


def _append_case(rng, page, lengths, n, kind=np.array):
    """flash-attn layout caches with room for n more keys a batch index, the new k and v, the
    lengths as `kind` makes them (np.array, list, or int when all equal)."""
    q, k, v, table = _cache(rng, lengths, H=4, Hk=2, Nq=n, d=40, page=page, capacity=64)
    flip = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    new_k, new_v = (rng.standard_normal((len(lengths), n, 2, 40)).astype(np.float32) for _ in range(2))
    seqlens = lengths[0] if kind is int else kind(np.array(lengths, np.int32))
    return flip(q), flip(k), flip(v), new_k, new_v, table, seqlens


@pytest.mark.parametrize("page", [None, 16, 1])
@pytest.mark.parametrize("n, lengths, kind", [(1, [40, 3], np.array), (3, [61, 0], list), (2, [17, 17], int)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_with_kvcache_appends_k_and_v(rng, page, n, lengths, kind, causal):
    """k and v go into the cache in place right after each batch index's keys (through the block
    table when paged), and the call attends to cache_seqlens + n keys: the same bits as writing
    them by hand (row by row) and calling without k and v."""
    q, kc, vc, k, v, table, seqlens = _append_case(rng, page, lengths, n, kind)
    want_k, want_v = kc.copy(), vc.copy()
    for b, s in enumerate(lengths):
        for i in range(n):
            j = s + i
            at = (b, j) if page is None else (table[b, j // page], j % page)
            want_k[at], want_v[at] = k[b, i], v[b, i]
    longer = [s + n for s in lengths]
    want = flash_attn_with_kvcache(q, want_k, want_v, cache_seqlens=np.array(longer, np.int32), block_table=table,
                                   causal=causal, return_softmax_lse=True)
    got = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, causal=causal,
                                  return_softmax_lse=True)
    np.testing.assert_array_equal(kc, want_k)
    np.testing.assert_array_equal(vc, want_v)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    _check(got[0].swapaxes(1, 2), got[1], q.swapaxes(1, 2), kc.swapaxes(1, 2), vc.swapaxes(1, 2), table, longer,
           page, {}, causal=causal)


@pytest.mark.parametrize("length", [64, 48])
@pytest.mark.parametrize("n", [0, 2])
def test_flash_attn_with_kvcache_cache_batch_idx(rng, length, n):
    """cache_batch_idx[b] is the cache row batch index b reads and appends to: the same bits as
    calling on the rows picked by hand; a row length that is not a power of two is gathered,
    and refuses new keys."""
    q, _, _, _ = _cache(rng, [0, 0], H=4, Hk=2, Nq=max(n, 1), d=40)
    q = np.ascontiguousarray(q.swapaxes(1, 2))
    kc, vc = (rng.standard_normal((5, length, 2, 40)).astype(np.float32) for _ in range(2))
    idx, lengths = np.array([3, 0], np.int32), np.array([30, length - n], np.int32)
    new = {} if n == 0 else {"k": rng.standard_normal((2, n, 2, 40)).astype(np.float32),
                             "v": rng.standard_normal((2, n, 2, 40)).astype(np.float32)}
    if n and length & (length - 1):
        with pytest.raises(ValueError, match="power of two"):
            flash_attn_with_kvcache(q, kc, vc, **new, cache_seqlens=lengths, cache_batch_idx=idx)
        return
    picked_k, picked_v = kc[idx], vc[idx]
    if n:
        for b in range(2):
            picked_k[b, lengths[b]:lengths[b] + n], picked_v[b, lengths[b]:lengths[b] + n] = new["k"][b], new["v"][b]
    want = flash_attn_with_kvcache(q, picked_k, picked_v, cache_seqlens=lengths + n, causal=True)
    got = flash_attn_with_kvcache(q, kc, vc, **new, cache_seqlens=lengths, cache_batch_idx=idx, causal=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kc[idx], picked_k)   # appended in place, in the rows picked
    np.testing.assert_array_equal(vc[idx], picked_v)
    for bad, match in (([3, 5], "lie in \\[0, 4\\]"), ([3], "shape \\(2,\\)"), ([0.5, 1.0], "integers")):
        with pytest.raises(ValueError, match=match):
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lengths, cache_batch_idx=np.array(bad))
    with pytest.raises(ValueError, match="pass one of them"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lengths, cache_batch_idx=idx, block_table=idx[:, None])


def _rotated_by_hand(x, cos, sin, positions, interleaved):
    """RoFormer's rotation, one pair of dims at a time in float64 (rotary.rotate's reference)."""
    out = x.astype(np.float64)
    half = cos.shape[1]
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            p = positions[b][i]
            for j in range(half):
                a, c = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
                out[b, i, :, a] = x[b, i, :, a] * float(cos[p, j]) - x[b, i, :, c] * float(sin[p, j])
                out[b, i, :, c] = x[b, i, :, a] * float(sin[p, j]) + x[b, i, :, c] * float(cos[p, j])
    return out


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_rotates_pairs_of_dims(rng, interleaved):
    """rotary.rotate against the rotation done pair by pair in float64: the first rotary_dim dims
    turn, the rest do not; float32 within a few ulps, fp16 as float32 rounded once."""
    from flashattn_cupy import rotary
    x = rng.standard_normal((2, 3, 4, 40)).astype(np.float32)
    angles = np.arange(50)[:, None] * (10000.0 ** (-np.arange(8) / 8))[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)   # rotary_dim 16
    positions = np.array([[7, 8, 9], [0, 0, 49]])
    got = rotary.rotate(x, cos, sin, positions, interleaved)
    want = _rotated_by_hand(x, cos, sin, positions, interleaved)
    np.testing.assert_array_equal(got[..., 16:], x[..., 16:])
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * 2.0**-24 * np.abs(x).max())
    half = rotary.rotate(x.astype(np.float16), cos, sin, positions, interleaved)
    np.testing.assert_array_equal(half, rotary.rotate(x.astype(np.float16).astype(np.float32), cos, sin, positions,
                                                      interleaved).astype(np.float16))
    with pytest.raises(ValueError, match="pass longer tables"):
        rotary.rotate(x, cos, sin, positions + 1, interleaved)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (5, 0))])
@pytest.mark.parametrize("page", [None, 16])
def test_flash_attn_with_kvcache_rotary(rng, causal, window, page):
    """With rotary tables the new keys are written rotated at cache_seqlens[b] + i, and q rotated
    at cache_seqlens[b] + i when causal or windowed, else every row at cache_seqlens[b]: the same
    bits as rotating by hand at those positions and appending without tables."""
    from flashattn_cupy import rotary
    q, kc, vc, k, v, table, seqlens = _append_case(rng, page, [40, 3], 3)
    angles = np.arange(64)[:, None] * (10000.0 ** (-np.arange(16) / 16))[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)   # rotary_dim 32 of 40
    lengths = np.array([40, 3])
    k_at = lengths[:, None] + np.arange(3)
    q_at = k_at if causal or window != (-1, -1) else np.repeat(lengths[:, None], 3, axis=1)
    kc2, vc2 = kc.copy(), vc.copy()
    want = flash_attn_with_kvcache(rotary.rotate(q, cos, sin, q_at, False), kc2, vc2,
                                   rotary.rotate(k, cos, sin, k_at, False), v, cache_seqlens=seqlens,
                                   block_table=table, causal=causal, window_size=window)
    got = flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                  block_table=table, causal=causal, window_size=window, rotary_interleaved=False)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kc, kc2)   # the keys went in rotated
    np.testing.assert_array_equal(vc, vc2)   # the values did not turn
    for bad, match in (({"rotary_cos": cos}, "together"), ({"rotary_cos": np.ones((64, 21), np.float32),
                                                            "rotary_sin": np.ones((64, 21), np.float32)},
                                                           "rotary_dim <= headdim"),
                       ({"rotary_cos": cos[:42], "rotary_sin": sin[:42]}, "pass longer tables")):
        with pytest.raises(ValueError, match=match):
            flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, **bad)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "v": None}, "k and v"),
    (lambda a: {**a, "cache_seqlens": None}, "needs cache_seqlens"),
    (lambda a: {**a, "cache_seqlens": np.array([62, 0], np.int32)}, "must fit in the cache"),
    (lambda a: {**a, "cache_seqlens": np.array([-1, 0], np.int32)}, "must fit in the cache"),
    (lambda a: {**a, "k": a["k"][:, :, :1], "v": a["v"][:, :, :1]}, "must both have shape"),
    (lambda a: {**a, "v": a["v"][:, :2]}, "must both have shape"),
    (lambda a: {**a, "k": a["k"].astype(np.float64)}, "the cache's dtype"),
    (lambda a: {**a, "block_table": a["block_table"] + 100}, "pages for the new keys must lie in"),
])
def test_appending_checks_before_writing(rng, change, match):
    """Every error is raised before the cache is touched."""
    q, kc, vc, k, v, table, seqlens = _append_case(rng, 16, [40, 0], 3)
    before = kc.copy(), vc.copy()
    args = change({"k": k, "v": v, "cache_seqlens": seqlens, "block_table": table})
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(q, kc, vc, **args)
    np.testing.assert_array_equal(kc, before[0])
    np.testing.assert_array_equal(vc, before[1])


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, t: flash_attention_kvcache(q[0], k, v, block_table=t), "q must have 4 dims"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v[:, :1], block_table=t), "the same shape"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k[:, :, :12], v[:, :, :12], block_table=t), "power of two"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v), "batch \\(2\\) as dim 0"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v, block_table=t[:1]), "shape \\(2, 2\\)"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v, block_table=t.astype(np.float32)), "integers"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v, block_table=t + 100), "lie in \\[0, 6\\]"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v, block_table=t, cache_seqlens=[3, 33]), "lie in \\[0, 32\\]"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v, block_table=t, cache_seqlens=-1), "lie in \\[0, 32\\]"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k, v, block_table=t, cache_seqlens=[1]), "shape \\(2,\\)"),
    (lambda q, k, v, t: flash_attention_kvcache(q, k[:, :, :, :8], v[:, :, :, :8], block_table=t), "head dim"),
])
def test_errors_say_what_to_fix(rng, call, match):
    q, k, v, table = _cache(rng, [32, 32], page=16, capacity=32, spare=3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v, table)


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(20, 3))],
                         ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("page", [None, 1, 16, 64, 128])
def test_decoding_launch_on_the_kernel_model(rng, monkeypatch, options, page):
    """The CUDA path's launch, run by tests/kernel_model.py's NumPy model of flash_decode (no GPU):
    the lengths and the block table go to the kernel as given, the cache in place (dim 0's stride
    the page stride, log2 of the page), and the model, reading as the kernel does, gives the
    reference's answer on each batch index's gathered keys."""
    lengths = [128, 0, 77, 1]
    q, k, v, table = _cache(rng, lengths, H=8, Hk=2, Nq=2, d=32, page=page, capacity=128)
    seqlens = np.array(lengths, np.int32)
    cache = kvcache._validate(q, k, v, seqlens, table, backend="c", return_lse=True,
                              **{"causal": False, "softmax_scale": None, "window": None, "softcap": 0.0,
                                 "alibi_slopes": None, **options})
    cache.problem = p = dataclasses.replace(cache.problem, backend="cuda", on_gpu=True)   # the model's "GPU"
    plan = planner.plan(2, 128, 32, dtype="float16", causal=p.causal, batch=4, heads=8, group=4, smem_limit=99 * 1024,
                        arch=80, sm_count=3, decode=True, **_cuda_backend.mask_options(p))
    launches = []
    kernel_model.use(monkeypatch, launches)
    O, L, _ = _cuda_backend.run_kvcache(cache, plan, 0)
    _check(O, L, q, k, v, table, lengths, page, {"compute": "float64"}, **options)
    main = launches[0]
    assert main["seqlens"] is seqlens and np.shares_memory(main["k"], k) and np.shares_memory(main["v"], v)
    if page is not None:
        assert main["table"] is cache.table
        assert (int(main["page_shift"]), int(main["bt_sb"])) == (page.bit_length() - 1, 128 // page)
        assert int(main["k_sb"]) == k.strides[0] // k.itemsize


@pytest.mark.parametrize("page, tile", [(None, 128), (256, 128), (128, 128), (64, 64), (16, 64), (1, 64)])
def test_the_decoding_tile_follows_the_page(rng, monkeypatch, page, tile):
    """kvcache plans with its page size: on an H100's limits d = 64 decodes in 128-key tiles,
    except from pages shorter than that (planner.DECODE_PAGED_MAX_BC)."""
    from flashattn_cupy import api
    q, k, v, table = _cache(rng, [256, 100], H=32, Hk=8, d=64, page=page, capacity=256)
    cache = kvcache._validate(q, k, v, None, table, backend="c", causal=False, softmax_scale=None, window=None,
                              softcap=0.0, alibi_slopes=None, return_lse=False)
    cache.problem = dataclasses.replace(cache.problem, backend="cuda", on_gpu=True, dtype="float16")   # a GPU's
    for name, value in (("compute_capability", 90), ("smem_limit", 227 * 1024), ("sm_count", 132)):
        monkeypatch.setattr(_device, name, lambda device_id=None, value=value: value)
    monkeypatch.setattr(api, "_device_id", lambda problem: 0)
    plan = kvcache._decoding_plan(cache)
    assert plan.kernel.startswith("flash_decode<fa_half, 64,") and plan.Bc == tile


# ---- CUDA: the decoding kernel reading the cache in place ----

GPU_CASES = [   # (H, Hk, Nq, d, page, capacity): one row a k/v head to 16, pages smaller and larger than a tile
    (8, 2, 1, 128, 16, 1024),
    (8, 2, 4, 128, 1, 300),
    (4, 4, 3, 40, 256, 768),
    (16, 1, 1, 64, 64, 2048),
    (4, 2, 2, 256, 32, 160),
]


@contextlib.contextmanager
def _decoding_tiles(kernel: str):
    """Decoding plans made within the block take `kernel`'s (warps, key tile, stages) (its name:
    flash_decode<T, D, warps, tile, stages, MASK>); plans and calls kept within it are dropped
    on the way out."""
    warps, tile, stages = (int(x) for x in kernel.split(",")[2:5])
    try:
        with planner._default("DECODE_TILES", ((planner.MAX_HEAD_DIM, ((warps, tile, stages),)),)):
            yield
    finally:
        kvcache._CALLS.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("H, Hk, Nq, d, page, capacity", GPU_CASES)
def test_cuda_decoding_reads_the_pages(rng, dtype, options, H, Hk, Nq, d, page, capacity):
    cp = _device.cupy()
    lengths = [capacity, 0, capacity // 3 + 5, 1]
    q, k, v, table = _cache(rng, lengths, H=H, Hk=Hk, Nq=Nq, d=d, page=page, capacity=capacity, dtype=dtype)
    kw = _options(rng, options, len(lengths), H)
    args = [cp.asarray(x) for x in (q, k, v)]
    seqlens, gpu_table = cp.asarray(lengths, dtype=cp.int32), cp.asarray(table)
    plan = _decoding_plan(*args, seqlens, gpu_table, **kw)
    assert plan is not None and plan.splits >= 1, "decoding shapes must take the decoding kernel"
    O, L = flash_attention_kvcache(*args, cache_seqlens=seqlens, block_table=gpu_table, return_lse=True, **kw)
    assert isinstance(O, cp.ndarray) and O.dtype == q.dtype and L.dtype == cp.float32
    O, L = cp.asnumpy(O), cp.asnumpy(L)
    _check(O, L, q, k, v, table, lengths, page, {"compute": "tensor_core", "p": dtype, "splits": plan.splits}, **kw)
    # the same keys in a contiguous cache, on the paged call's tiles (pages shorter than a tile
    # get smaller tiles than a contiguous cache: planner.DECODE_PAGED_MAX_BC): the same
    # arithmetic, so the same bits
    contiguous = [cp.asarray(np.stack([np.concatenate(list(x[table[b]]), axis=1) for b in range(len(lengths))]))
                  for x in (k, v)]
    with _decoding_tiles(plan.kernel):
        O_c, L_c = flash_attention_kvcache(args[0], *contiguous, cache_seqlens=seqlens, return_lse=True, **kw)
        assert _decoding_plan(args[0], *contiguous, seqlens, None, **kw).kernel == plan.kernel
    np.testing.assert_array_equal(cp.asnumpy(O_c), O)
    np.testing.assert_array_equal(cp.asnumpy(L_c), L)


@pytest.mark.gpu
def test_cuda_lengths_out_of_range_are_clamped(rng):
    """GPU lengths are not read back: one past the capacity reads the whole cache, a negative one
    none (O = 0, L = -inf), never memory outside it."""
    cp = _device.cupy()
    q, k, v, table = _cache(rng, [64, 64], H=8, Hk=2, d=64, page=16, capacity=64, dtype="float16")
    args = [cp.asarray(x) for x in (q, k, v, table)]
    O, L = flash_attention_kvcache(*args[:3], cache_seqlens=cp.asarray([65, -4], cp.int32), block_table=args[3],
                                   return_lse=True)
    full, L_full = flash_attention_kvcache(*args[:3], cache_seqlens=cp.asarray([64, 0], cp.int32),
                                           block_table=args[3], return_lse=True)
    np.testing.assert_array_equal(cp.asnumpy(O), cp.asnumpy(full))
    np.testing.assert_array_equal(cp.asnumpy(L), cp.asnumpy(L_full))
    assert (cp.asnumpy(O[1]) == 0).all() and np.isneginf(cp.asnumpy(L[1])).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, Nq", [("float32", 1), ("float16", 20)])
def test_cuda_other_shapes_gather_the_keys(rng, dtype, Nq):
    """float32, or more than 16 rows a k/v head: no decoding kernel; each batch index's keys are
    gathered and computed by flash_attention (its kernels' bounds)."""
    cp = _device.cupy()
    lengths = [70, 0, 129]
    q, k, v, table = _cache(rng, lengths, H=4, Hk=2, Nq=Nq, d=64, page=16, capacity=160, dtype=dtype)
    args = [cp.asarray(x) for x in (q, k, v)]
    seqlens, gpu_table = cp.asarray(lengths, cp.int32), cp.asarray(table)
    assert _decoding_plan(*args, seqlens, gpu_table, causal=True) is None
    O, L = flash_attention_kvcache(*args, cache_seqlens=seqlens, block_table=gpu_table, causal=True, return_lse=True)
    gathered = [cp.asarray(_keys(x, table, 0, lengths[0], 16)) for x in (k, v)]   # what batch index 0 ran on
    rounding = kernel_rounding(plan_for(args[0][0], *gathered, causal=True))
    _check(cp.asnumpy(O), cp.asnumpy(L), q, k, v, table, lengths, 16, rounding, causal=True)


@pytest.mark.gpu
def test_a_decoding_loop_reuses_its_call(rng, monkeypatch):
    """Step after step on the same arrays, new lengths written into the same int32 array: the kept
    Call launches again without validation or planning, and each step gives what a fresh call
    (int64 lengths: converted, so validated and not kept) gives."""
    cp = _device.cupy()
    q, k, v, table = _cache(rng, [256, 256], H=8, Hk=2, d=64, page=16, capacity=256, dtype="float16")
    args = [cp.asarray(x) for x in (q, k, v)]
    gpu_table, lengths = cp.asarray(table), cp.zeros(2, cp.int32)
    steps = [(5, 2), (64, 200), (256, 0)]
    fresh = [cp.asnumpy(flash_attention_kvcache(*args, cache_seqlens=cp.asarray(n, cp.int64), block_table=gpu_table,
                                                causal=True)) for n in steps]
    kvcache._CALLS.clear()
    for step, (n, expected) in enumerate(zip(steps, fresh)):
        lengths[...] = cp.asarray(n, cp.int32)
        O = flash_attention_kvcache(*args, cache_seqlens=lengths, block_table=gpu_table, causal=True)
        np.testing.assert_array_equal(cp.asnumpy(O), expected)
        assert len(kvcache._CALLS) == 1
        if step == 0:   # from now on the kept call alone
            monkeypatch.setattr(kvcache, "_validate", lambda *a, **kw: pytest.fail("validated again"))


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 16, 64])   # 64: the whole capacity in one page
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_flash_attn_with_kvcache_appends_k_and_v(rng, page, dtype):
    """CuPy caches, lengths and block table on the GPU: k and v land where a host write puts them,
    the lengths come back on the GPU (+ n), and the output is the call on the longer cache's
    (decoding for fp16, the gathering path for fp32)."""
    cp = _device.cupy()
    q, kc, vc, k, v, table, seqlens = _append_case(rng, page, [40, 3], 2)
    cast = lambda x: cp.asarray(x.astype(dtype))  # noqa: E731
    gpu = dict(q=cast(q), kc=cast(kc), vc=cast(vc), k=cast(k), v=cast(v))
    gpu_table = None if table is None else cp.asarray(table)
    want_k, want_v = gpu["kc"].copy(), gpu["vc"].copy()
    for b, s in enumerate([40, 3]):
        for i in range(2):
            at = (b, s + i) if page is None else (int(table[b, (s + i) // page]), (s + i) % page)
            want_k[at], want_v[at] = gpu["k"][b, i], gpu["v"][b, i]
    longer = cp.asarray([42, 5], cp.int32)
    want = flash_attn_with_kvcache(gpu["q"], want_k, want_v, cache_seqlens=longer, block_table=gpu_table,
                                   causal=True, return_softmax_lse=True)
    lengths = cp.asarray(seqlens)
    got = flash_attn_with_kvcache(gpu["q"], gpu["kc"], gpu["vc"], gpu["k"], gpu["v"], cache_seqlens=lengths,
                                  block_table=gpu_table, causal=True, return_softmax_lse=True)
    np.testing.assert_array_equal(cp.asnumpy(gpu["kc"]), cp.asnumpy(want_k))
    np.testing.assert_array_equal(cp.asnumpy(gpu["vc"]), cp.asnumpy(want_v))
    assert (cp.asnumpy(lengths) == [40, 3]).all()   # the caller's lengths are not changed
    for a, b in zip(got, want):
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


@pytest.mark.gpu
def test_cuda_cache_batch_idx_reads_rows_in_place(rng):
    """fp16 CuPy cache of 256-key rows, GPU indices: decoding reads row cache_batch_idx[b] in place
    (one page a row) and appends there; the same bits as the rows picked by hand."""
    cp = _device.cupy()
    q = cp.asarray(rng.standard_normal((2, 1, 8, 64)).astype(np.float16))
    kc, vc = (cp.asarray(rng.standard_normal((4, 256, 2, 64)).astype(np.float16)) for _ in range(2))
    k, v = (cp.asarray(rng.standard_normal((2, 1, 2, 64)).astype(np.float16)) for _ in range(2))
    idx, lengths = cp.asarray([2, 0], cp.int32), cp.asarray([200, 17], cp.int32)
    picked_k, picked_v = kc[idx], vc[idx]
    picked_k[0, 200], picked_v[0, 200], picked_k[1, 17], picked_v[1, 17] = k[0, 0], v[0, 0], k[1, 0], v[1, 0]
    want = flash_attn_with_kvcache(q, picked_k, picked_v, cache_seqlens=lengths + 1, causal=True)
    got = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, cache_batch_idx=idx, causal=True)
    np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(want))
    np.testing.assert_array_equal(cp.asnumpy(kc[idx]), cp.asnumpy(picked_k))
    np.testing.assert_array_equal(cp.asnumpy(vc[idx]), cp.asnumpy(picked_v))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_rotary_with_appended_keys(rng, dtype):
    """CuPy fp16/bf16: the rotary tables on the GPU rotate q and the new keys as the NumPy path
    does (the same float32 arithmetic, rounded once), and decoding then reads the rotated keys."""
    from flashattn_cupy import rotary
    cp = _device.cupy()
    q, kc, vc, k, v, table, seqlens = _append_case(rng, 16, [40, 3], 1)
    angles = np.arange(64)[:, None] * (10000.0 ** (-np.arange(16) / 16))[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    host_type = np_dtype(dtype)
    gpu = {name: cp.asarray(x.astype(host_type)) for name, x in (("q", q), ("kc", kc), ("vc", vc), ("k", k), ("v", v))}
    at = np.array([[40], [3]])
    want_q = cp.asnumpy(rotary.rotate(gpu["q"], cp.asarray(cos), cp.asarray(sin), at, True))
    np.testing.assert_array_equal(want_q, rotary.rotate(q.astype(host_type), cos, sin, at, True))
    kc2, vc2 = gpu["kc"].copy(), gpu["vc"].copy()
    want = flash_attn_with_kvcache(cp.asarray(want_q), kc2, vc2, rotary.rotate(gpu["k"], cp.asarray(cos), cp.asarray(sin),
                                   at, True), gpu["v"], cache_seqlens=cp.asarray(seqlens), block_table=cp.asarray(table),
                                   causal=True)
    got = flash_attn_with_kvcache(gpu["q"], gpu["kc"], gpu["vc"], gpu["k"], gpu["v"], rotary_cos=cp.asarray(cos),
                                  rotary_sin=cp.asarray(sin), cache_seqlens=cp.asarray(seqlens),
                                  block_table=cp.asarray(table), causal=True)
    np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(want))
    np.testing.assert_array_equal(cp.asnumpy(gpu["kc"]), cp.asnumpy(kc2))
