"""flash_attention_varlen and flash_attn_varlen_func: packed variable-length batches.

Each sequence must get what flash_attention gives it alone (bitwise on the C twin, which runs
it on its own; within the reference bounds on CUDA, whose one launch covers every sequence),
with empty sequences and sequences without keys, GQA, windows, softcap and ALiBi.
"""
import numpy as np
import pytest

import emulated
import kernel_model
from backends import BACKEND_DTYPES, FP32_OPTIONS, np_dtype
from flashattn_cupy import (_c_backend, _cuda_backend, _device, flash_attention, flash_attention_varlen,
                            flash_attn_varlen_func, plan_for)
from tolerances import assert_attention_close, kernel_rounding


def _packed(rng, lengths_q, lengths_k, H=4, Hk=2, d=40, dtype=np.float32, magnitude=1.0):
    """q (total_q, H, d), k, v (total_k, Hk, d), and int32 offsets."""
    q = (magnitude * rng.standard_normal((sum(lengths_q), H, d))).astype(dtype)
    k, v = (rng.standard_normal((sum(lengths_k), Hk, d)).astype(dtype) for _ in range(2))
    cu = [np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (lengths_q, lengths_k)]
    return q, k, v, cu[0], cu[1]


def _sequences(q, k, v, cu_q, cu_k):
    """(rows, q_s, k_s, v_s) per sequence, q_s (H, nq, d), k_s, v_s (Hk, nk, d)."""
    for s in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        yield rows, q[rows].swapaxes(0, 1), k[keys].swapaxes(0, 1), v[keys].swapaxes(0, 1)


def _slopes_of(slopes, s):
    return None if slopes is None else (slopes if slopes.ndim == 1 else slopes[s])


# (lengths_q, lengths_k): ragged, empty sequences, a sequence without keys, one row, Nq != Nk both ways
LENGTHS = [
    ([5, 0, 17, 1, 130], [7, 4, 0, 1, 70]),
    ([1, 1, 1], [300, 1, 65]),
    ([64, 200], [64, 129]),
    ([0, 0], [3, 0]),
    ([33], [33]),
]
# flash_attention options, each sequence on its own
OPTIONS = [dict(), dict(causal=True), dict(causal=True, window=(6, -1)), dict(window=(3, 8)),
           dict(softcap=2.0, causal=True), dict(alibi="heads", window=(0, 0)), dict(alibi="batch", softcap=5.0)]


def _options(rng, options, batch, H):
    alibi = options.get("alibi")
    slopes = None if alibi is None else rng.uniform(0, 1, (H,) if alibi == "heads" else (batch, H)).astype(np.float32)
    return {**{key: value for key, value in options.items() if key != "alibi"}, "alibi_slopes": slopes}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS)
def test_c_equals_flash_attention_per_sequence(rng, dtype, options, lengths_q, lengths_k):
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, dtype=dtype, magnitude=2.0)
    kw = _options(rng, options, len(lengths_q), 4)
    O, L = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True, **kw)
    assert O.shape == q.shape and O.dtype == q.dtype and L.shape == (4, q.shape[0]) and L.dtype == np.float32
    for s, (rows, q_s, k_s, v_s) in enumerate(_sequences(q, k, v, cu_q, cu_k)):
        if q_s.shape[1] == 0:
            continue
        if k_s.shape[1] == 0:   # queries and no keys
            assert (O[rows] == 0).all() and np.isneginf(L[:, rows]).all()
            continue
        kw_s = {**kw, "alibi_slopes": _slopes_of(kw["alibi_slopes"], s)}
        O_s, L_s = flash_attention(q_s, k_s, v_s, return_lse=True, **kw_s)
        np.testing.assert_array_equal(O[rows], O_s.swapaxes(0, 1))
        np.testing.assert_array_equal(L[:, rows], L_s)
        O_r, L_r = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True,
                                          backend="reference", **kw)
        assert_attention_close(O_r[rows].swapaxes(0, 1), L_r[:, rows], q_s, k_s, v_s, compute="float64",
                               **{**kw_s, "alibi_slopes": _per_head(kw_s["alibi_slopes"], 4)})


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_num_threads_gives_the_same_bits(rng, threads):
    """num_threads shares each sequence's heads among threads, as flash_attention's does: the
    result is bitwise the one-thread result (GQA and per-sequence slopes sliced with the heads)."""
    lengths_q, lengths_k = [5, 0, 17, 1, 130], [7, 4, 0, 1, 70]
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k)
    kw = dict(causal=True, alibi_slopes=rng.uniform(0, 1, (5, 4)).astype(np.float32), return_lse=True)
    one = flash_attention_varlen(q, k, v, cu_q, cu_k, 130, 70, **kw)
    many = flash_attention_varlen(q, k, v, cu_q, cu_k, 130, 70, num_threads=threads, **kw)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def _per_head(slopes, H):
    return None if slopes is None else np.broadcast_to(slopes, (H,))


@pytest.mark.parametrize("backend", ["c", "reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_empty_batches(rng, backend):
    """No sequence, no rows, or no keys at all (k and v of 0 rows): O = 0, L = -inf, right shapes."""
    for lengths_q, lengths_k in (([], []), ([0, 0], [0, 0]), ([0, 0], [3, 5]), ([2, 3], [0, 0])):
        q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, d=16)
        O, L = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q, default=0), max(lengths_k, default=0),
                                      return_lse=True, backend=backend)
        assert O.shape == q.shape and L.shape == (4, q.shape[0]) and isinstance(O, np.ndarray)
        assert (O == 0).all() and np.isneginf(L).all()


def test_int64_offsets_lists_and_loose_max_seqlen(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [5, 9], [7, 3])
    O = flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 7, causal=True)
    np.testing.assert_array_equal(flash_attention_varlen(q, k, v, cu_q.astype(np.int64), cu_k.tolist(), 100, 10**6,
                                                         causal=True), O)


def test_flash_attn_varlen_func_is_flash_attention_varlen(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [5, 0, 9], [7, 2, 3])
    slopes = rng.uniform(0, 1, 4).astype(np.float32)
    O, L = flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 7, causal=True, window=(2, 0), softcap=3.0,
                                  alibi_slopes=slopes, softmax_scale=0.3, return_lse=True)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 7, 0.0, 0.3, True, (2, 5), 3.0, slopes,
                                             return_attn_probs=True)
    assert probs is None
    np.testing.assert_array_equal(out, O)
    np.testing.assert_array_equal(lse, L)
    np.testing.assert_array_equal(flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 7, softmax_scale=0.3, causal=True,
                                                         window_size=(2, 0), softcap=3.0, alibi_slopes=slopes), O)
    with pytest.raises(ValueError, match="block_table: a paged KV cache is not supported"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 7, block_table=np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match="dropout is not supported"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 7, dropout_p=0.5)


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0, CPU)")
    q, k, v, cu_q, cu_k = _packed(rng, [5, 9], [7, 3])
    out = flash_attn_varlen_func(*map(torch.from_numpy, (q, k, v, cu_q, cu_k)), 9, 7, causal=True)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 7, causal=True))


def test_the_cuda_path_launches_once_over_every_sequence(rng, monkeypatch):
    """Without a GPU: run_varlen's one launch, read as the kernels read it (kernel_model.py), gives
    each sequence its own attention: offsets, strides, L's (heads, total_q) layout, slopes."""
    launches = []
    kernel_model.use(monkeypatch, launches)
    monkeypatch.setattr(_device, "smem_limit", lambda device_id=None: 100 * 1024)
    monkeypatch.setattr(_device, "compute_capability", lambda device_id=None: 80)
    from flashattn_cupy import varlen
    lengths_q, lengths_k = [5, 0, 17, 1, 40], [7, 4, 0, 1, 30]
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, H=6, Hk=3, d=16)
    slopes = rng.uniform(0, 1, (5, 6)).astype(np.float32)
    kw = dict(causal=True, window=(4, -1), softcap=2.0, alibi_slopes=slopes)
    problem = varlen._validate(q, k, v, cu_q, cu_k, 40, 30, softmax_scale=None, return_lse=True, backend="c", num_threads=1,
                               allow_tf32=False, fp32_kernel="auto", **kw)
    O, L = _cuda_backend.run_varlen(problem, 0)
    [launch] = launches
    assert (launch["B"], launch["H"], launch["group"], launch["Nq"], launch["Nk"]) == (5, 6, 2, 40, 30)
    for s, (rows, q_s, k_s, v_s) in enumerate(_sequences(q, k, v, cu_q, cu_k)):
        if q_s.shape[1] and k_s.shape[1]:
            assert_attention_close(O[rows].swapaxes(0, 1), L[:, rows], q_s, k_s, v_s, compute="float64",
                                   **{**kw, "alibi_slopes": slopes[s]})
        elif q_s.shape[1]:
            assert (O[rows] == 0).all() and np.isneginf(L[:, rows]).all()


@pytest.mark.skipif(emulated.unavailable_reason() is not None, reason=str(emulated.unavailable_reason()))
@pytest.mark.parametrize("arch, limit, family", [(75, 64 * 1024, "flash_fwd_simt"), (80, 163 * 1024, "flash_fwd_fma")])
@pytest.mark.parametrize("options", [dict(), dict(causal=True, window=(50, -1), softcap=2.0, alibi="batch")],
                         ids=["plain", "mods"])
def test_the_cuda_core_kernels_run_varlen_on_the_cpu(rng, monkeypatch, arch, limit, family, options):
    """That launch run by the CUDA-core kernels' own code (emulated.py, no GPU): each sequence its
    attention within the float32 bounds, one without rows and one without keys among them, the
    longest over several Q and key tiles (the others' tiles past their end return at once)."""
    emulated.use(monkeypatch)
    monkeypatch.setattr(_device, "smem_limit", lambda device_id=None: limit)
    monkeypatch.setattr(_device, "compute_capability", lambda device_id=None: arch)
    from flashattn_cupy import varlen
    lengths_q, lengths_k = [70, 0, 17, 1, 150], [65, 4, 0, 1, 130]
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, H=4, Hk=2, d=40)
    kw = {"causal": False, "window": None, "softcap": 0.0, **_options(rng, options, len(lengths_q), 4)}
    problem = varlen._validate(q, k, v, cu_q, cu_k, 150, 130, softmax_scale=None, return_lse=True, backend="cuda",
                               num_threads=1, allow_tf32=False, fp32_kernel="simt", **kw)
    del emulated.launched[:]
    O, L = _cuda_backend.run_varlen(problem, 0)
    [name] = emulated.launched
    assert name.startswith(family + "<") and name.endswith(f", {2 if options else 0}>")
    for s, (rows, q_s, k_s, v_s) in enumerate(_sequences(q, k, v, cu_q, cu_k)):
        if q_s.shape[1] and k_s.shape[1]:
            assert_attention_close(O[rows].swapaxes(0, 1), L[:, rows], q_s, k_s, v_s,
                                   **{**kw, "alibi_slopes": _slopes_of(kw["alibi_slopes"], s)})
        elif q_s.shape[1]:
            assert (O[rows] == 0).all() and np.isneginf(L[:, rows]).all()


def _bad(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [3, 5], [4, 6], H=4, Hk=2, d=16)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=6)


# (id, changes to _bad's arguments, exception, words)
ERRORS = [
    ("q 4-d", lambda a: dict(q=a["q"][None]), ValueError, "q must have shape (total_q, heads, d)"),
    ("k 2-d", lambda a: dict(k=a["k"][0]), ValueError, "k must have shape (total_k, heads, d)"),
    ("kv heads", lambda a: dict(k=a["k"][:, :1].repeat(3, 1), v=a["v"][:, :1].repeat(3, 1)), ValueError,
     "q has 4 heads"),
    ("dtype", lambda a: dict(q=a["q"].astype(np.float64)), TypeError, "same dtype"),
    ("offsets float", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].astype(np.float32)), TypeError,
     "cu_seqlens_q must be int32 or int64"),
    ("offsets int16", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"].astype(np.int16)), TypeError,
     "cu_seqlens_k must be int32 or int64"),
    ("offsets a scalar", lambda a: dict(cu_seqlens_q=3), TypeError, "cu_seqlens_q must be an int32 or int64 1-D"),
    ("offsets 2-d", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"][None]), ValueError, "must be 1-D"),
    ("offsets empty", lambda a: dict(cu_seqlens_q=np.zeros(0, np.int32)), ValueError, "must be 1-D"),
    ("offsets from 1", lambda a: dict(cu_seqlens_q=np.array([1, 3, 8], np.int32)), ValueError,
     "cu_seqlens_q must start at 0, never decrease, and end at 8"),
    ("offsets decrease", lambda a: dict(cu_seqlens_k=np.array([0, 6, 4, 10], np.int32)), ValueError,
     "got [0, 6, 4, 10]"),
    ("offsets short of total", lambda a: dict(cu_seqlens_k=np.array([0, 4, 9], np.int32)), ValueError,
     "end at 10 (the rows of k and v)"),
    ("offsets counts differ", lambda a: dict(cu_seqlens_q=np.array([0, 8], np.int32), max_seqlen_q=8), ValueError,
     "the same count, got 2 and 3"),
    ("max_seqlen short", lambda a: dict(max_seqlen_q=4), ValueError,
     "max_seqlen_q must be at least the longest sequence (5)"),
    ("max_seqlen huge", lambda a: dict(max_seqlen_k=2**31), ValueError, "below 2**31"),
    ("max_seqlen float", lambda a: dict(max_seqlen_k=6.0), TypeError, "max_seqlen_k must be an int"),
    ("max_seqlen bool", lambda a: dict(max_seqlen_q=True), TypeError, "max_seqlen_q must be an int"),
    ("slopes per sequence", lambda a: dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError,
     "alibi_slopes must have shape (4,) (one slope per head) or (2, 4)"),
    ("window", lambda a: dict(window=(-3, 0)), ValueError, "left must be >= 0"),
    ("softcap", lambda a: dict(softcap=-2.0), ValueError, "softcap must be 0 (off)"),
    ("num_threads type", lambda a: dict(num_threads=2.0), TypeError, "num_threads must be a positive int"),
    ("num_threads off the C backend", lambda a: dict(num_threads=2, backend="reference"), ValueError,
     "num_threads applies to the C backend only"),
]


@pytest.mark.parametrize("change, exc, words", [pytest.param(*case[1:], id=case[0]) for case in ERRORS])
def test_errors_before_any_backend_runs(rng, monkeypatch, change, exc, words):
    def fail(*args, **kw):
        raise AssertionError("a backend ran")
    monkeypatch.setattr(_c_backend, "run", fail)
    args = _bad(rng)
    args.update(change(args))
    positional = [args.pop(name) for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                              "max_seqlen_k")]
    with pytest.raises(exc) as info:
        flash_attention_varlen(*positional, **args)
    assert words in str(info.value)


# The GPU: every dtype and float32 kernel, one launch over all sequences, against the reference
GPU_CASES = [
    ([77, 0, 1, 300, 129], [203, 5, 1, 300, 0], 64, dict()),
    ([77, 0, 1, 300, 129], [203, 5, 1, 300, 0], 64, dict(causal=True)),
    ([203, 17, 1], [77, 33, 256], 40, dict(causal=True, window=(20, -1))),
    ([128, 1, 65], [128, 300, 64], 128, dict(window=(16, 16), softcap=3.0)),
    ([100, 31], [150, 31], 80, dict(alibi="batch", causal=True)),
    ([1, 1, 1, 1], [513, 2, 1, 64], 256, dict(alibi="heads", softcap=1.0)),
]


@pytest.mark.parametrize("backend, dtype", [p for p in BACKEND_DTYPES if p.id.startswith("cuda")])
@pytest.mark.parametrize("lengths_q, lengths_k, d, options", GPU_CASES)
def test_cuda_against_the_reference(rng, cp, backend, dtype, lengths_q, lengths_k, d, options):
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, H=6, Hk=2, d=d, dtype=np_dtype(dtype), magnitude=2.0)
    kw = _options(rng, options, len(lengths_q), 6)
    fp32 = FP32_OPTIONS[backend]
    args = [cp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    O, L = flash_attention_varlen(*args, max(lengths_q), max(lengths_k), return_lse=True, **kw, **fp32)
    assert isinstance(O, cp.ndarray) and O.shape == q.shape and L.shape == (6, q.shape[0])
    O, L = cp.asnumpy(O), cp.asnumpy(L)
    for s, (rows, q_s, k_s, v_s) in enumerate(_sequences(q, k, v, cu_q, cu_k)):
        if not q_s.shape[1]:
            continue
        if not k_s.shape[1]:
            assert (O[rows] == 0).all() and np.isneginf(L[:, rows]).all()
            continue
        kw_s = {**kw, "alibi_slopes": _per_head(_slopes_of(kw["alibi_slopes"], s), 6)}
        rounding = kernel_rounding(plan_for(*(cp.asarray(x) for x in (q_s, k_s, v_s)), **kw_s, **fp32))
        assert_attention_close(O[rows].swapaxes(0, 1), L[:, rows], q_s, k_s, v_s, **kw_s, **rounding)


@pytest.mark.gpu
def test_cuda_offsets_from_the_host_or_int64_and_numpy_round_trip(rng, cp):
    q, k, v, cu_q, cu_k = _packed(rng, [50, 0, 70], [60, 9, 1], dtype=np.float16)
    expected = cp.asnumpy(flash_attention_varlen(*map(cp.asarray, (q, k, v, cu_q, cu_k)), 70, 60, causal=True))
    O = flash_attention_varlen(*map(cp.asarray, (q, k, v)), cu_q, cp.asarray(cu_k, dtype=cp.int64), 70, 60, causal=True)
    np.testing.assert_array_equal(cp.asnumpy(O), expected)
    O = flash_attention_varlen(q, k, v, cu_q, cu_k, 70, 60, causal=True, backend="cuda")
    assert isinstance(O, np.ndarray)
    np.testing.assert_array_equal(O, expected)
    with pytest.raises(TypeError, match="cu_seqlens_q is a CuPy array and q, k, v are NumPy"):
        flash_attention_varlen(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), cp.asarray(cu_q),
                               cu_k, 70, 60)
