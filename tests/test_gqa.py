"""Grouped-query and multi-query attention: k and v with fewer heads (dim -3) than q, read in place.

Query head h reads key/value head h // group. Each backend is checked against the float64
reference (which broadcasts k and v over the group) and, bitwise, against itself on k and v
repeated to q's heads: the same numbers reach the same code, so only a wrong head can differ.
"""
import dataclasses

import numpy as np
import pytest

import kernel_model
from backends import BACKEND_DTYPES, np_dtype, run
from cases import inputs
from flashattn_cupy import _c_backend, _cuda_backend, flash_attention, kernels, plan_for, planner, reference
from flashattn_cupy._validate import validate
from tolerances import assert_attention_close, kernel_rounding

# (leading dims of q, k/v heads): group sizes 1 (MQA over 6 heads), 2, 3, 4, 5 and plain attention
GROUPS = [((2, 6), 1), ((2, 6), 2), ((2, 6), 3), ((1, 8), 2), ((3, 5), 1), ((5,), 1), ((2, 2, 4), 1),
          ((2, 3), 3)]


def _gqa_inputs(rng, lead, kv_heads, Nq, Nk, d, dtype=np.float32):
    q = rng.standard_normal(lead + (Nq, d)).astype(dtype)
    k, v = (rng.standard_normal(lead[:-1] + (kv_heads, Nk, d)).astype(dtype) for _ in range(2))
    return q, k, v


def _repeated(q, k, v):
    group = q.shape[-3] // k.shape[-3]
    return q, np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("lead, kv_heads", GROUPS)
@pytest.mark.parametrize("Nq, Nk, d, causal", [(1, 77, 64, False), (33, 31, 40, True), (113, 203, 80, True),
                                               (70, 50, 16, True)])
def test_against_the_reference_and_repeated_heads(rng, backend, dtype, lead, kv_heads, Nq, Nk, d, causal):
    q, k, v = _gqa_inputs(rng, lead, kv_heads, Nq, Nk, d, np_dtype(dtype))
    O, L, rounding = run(backend, q, k, v, causal=causal)
    assert O.shape == q.shape and L.shape == q.shape[:-1]
    assert_attention_close(O, L, q, k, v, causal=causal, **rounding)
    O_rep, L_rep, _ = run(backend, *_repeated(q, k, v), causal=causal)
    np.testing.assert_array_equal(O, O_rep)
    np.testing.assert_array_equal(L, L_rep)


def test_reference_broadcasts_each_kv_head_over_its_group(rng):
    q, k, v = _gqa_inputs(rng, (2, 6), 2, 9, 11, 8)
    O, L = reference.attention(q, k, v, causal=True)
    for h in range(6):
        O_h, L_h = reference.attention(q[:, h], k[:, h // 3], v[:, h // 3], causal=True)
        np.testing.assert_array_equal(O[:, h], O_h)
        np.testing.assert_array_equal(L[:, h], L_h)


@pytest.mark.parametrize("num_threads", [2, 3, 4, 7, 12, 13])
def test_threads_cut_groups_anywhere(rng, num_threads):
    """Thread slices start inside groups of q heads (12 heads, groups of 4 or 6): bitwise the same
    as one thread, and as k and v repeated."""
    for kv_heads in (3, 2, 1):
        q, k, v = _gqa_inputs(rng, (12,), kv_heads, 40, 70, 24)
        O1, L1 = flash_attention(q, k, v, causal=True, return_lse=True)
        O, L = flash_attention(q, k, v, causal=True, return_lse=True, num_threads=num_threads)
        np.testing.assert_array_equal(O, O1)
        np.testing.assert_array_equal(L, L1)
        np.testing.assert_array_equal(O, flash_attention(*_repeated(q, k, v), causal=True))


def test_c_twin_reads_k_and_v_in_place(rng, monkeypatch):
    """The C calls get pointers into the caller's k and v buffers (no repeat, no copy), one kv
    head per group of q heads, and the group size."""
    calls = []
    real = _c_backend.lib

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def flash_fwd_f32(self, Q, K, V, O, L, BH, group, *rest):
            address = lambda p: int(_c_backend.ffi.cast("uintptr_t", p))  # noqa: E731
            calls.append((address(K), address(V), BH, group))
            return real.flash_fwd_f32(Q, K, V, O, L, BH, group, *rest)

    monkeypatch.setattr(_c_backend, "lib", Spy())
    q, k, v = _gqa_inputs(rng, (2, 8), 2, 30, 500, 32)
    head = k[0, 0].nbytes
    flash_attention(q, k, v, num_threads=3)    # 16 q heads on 3 threads: slices 0-4, 5-9, 10-15
    starts = sorted((K - k.ctypes.data, V - v.ctypes.data, BH, group) for K, V, BH, group in calls)
    # q heads 0-4 from kv head 0 (heads 4 on read kv 1); 5-7 (kv 1) then 8-9 (kv 2); 10-11 (kv 2)
    # then 12-15 (kv 3): a slice starting inside a group finishes that group in its own call
    assert starts == [(0, 0, 5, 4), (head, head, 3, 4), (2 * head, 2 * head, 2, 4),
                      (2 * head, 2 * head, 2, 4), (3 * head, 3 * head, 4, 4)]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("lead, kv_heads", [((2, 6), 2), ((3, 4), 1), ((6,), 3), ((2, 6), 6)])
def test_cuda_path_views_and_launches(rng, monkeypatch, layout, lead, kv_heads):
    """Any layout is one launch whose k and v are views of the caller's arrays, with the group
    as an argument (kernel_model.py reads the launch as the kernels do), and O, L are right."""
    q, k, v = _gqa_inputs(rng, lead, kv_heads, 21, 33, 8)
    if layout == "bnhd":   # the same values, in memory ordered (..., N, heads, d)
        q, k, v = (np.ascontiguousarray(np.swapaxes(x, -2, -3)).swapaxes(-2, -3) for x in (q, k, v))
    launches = []
    kernel_model.use(monkeypatch, launches)
    problem = dataclasses.replace(validate(q, k, v, causal=False, softmax_scale=None, return_lse=True,
                                           backend="c"), backend="cuda")
    plan = planner.plan(problem.Nq, problem.Nk, problem.d, batch=problem.batch, heads=problem.heads,
                        smem_limit=100 * 1024, arch=80)
    O, L = _cuda_backend.run(problem, plan, 0)
    O_ref, L_ref = reference.attention(q, k, v)
    np.testing.assert_allclose(O, O_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=1e-5)
    [launch] = launches
    assert (launch["H"], launch["group"]) == (lead[-1], lead[-1] // kv_heads)
    # views of the caller's arrays (a copy, repeated or not, would share no memory with them)
    assert all(np.shares_memory(launch[name], x) for name, x in zip("qkv", (q, k, v)))


@pytest.mark.parametrize("q_shape, k_shape, words", [
    ((2, 6, 8, 16), (2, 4, 8, 16), "q has 6 heads (dim -3) and k, v have 4"),
    ((2, 2, 8, 16), (2, 4, 8, 16), "q has 2 heads (dim -3) and k, v have 4"),
    ((2, 6, 8, 16), (3, 2, 8, 16), "same leading (batch, heads) dims, except that k and v may have fewer heads"),
    ((2, 6, 8, 16), (2, 8, 16), "same leading (batch, heads) dims"),
    ((6, 8, 16), (2, 1, 8, 16), "same leading (batch, heads) dims"),
])
def test_head_errors(q_shape, k_shape, words):
    q, k = np.zeros(q_shape, np.float32), np.zeros(k_shape, np.float32)
    with pytest.raises(ValueError) as info:
        flash_attention(q, k, k)
    assert words in str(info.value)


def test_v_heads_must_match_k_heads():
    q, k = np.zeros((2, 6, 8, 16), np.float32), np.zeros((2, 3, 8, 16), np.float32)
    with pytest.raises(ValueError, match="same leading"):
        flash_attention(q, k, np.zeros((2, 2, 8, 16), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cuda_kernels_read_k_and_v_in_place(rng, cp, monkeypatch, layout):
    """On the GPU: every launch's k and v are views into the caller's buffers (data pointers
    within them, never a copy), and the result is within the reference bounds."""
    seen = []
    strides = _cuda_backend._strides

    def spy(x, cp_):
        y, st = strides(x, cp_)
        seen.append((y is x, y.data.ptr))
        return y, st

    monkeypatch.setattr(_cuda_backend, "_strides", spy)
    q, k, v = _gqa_inputs(rng, (3, 8), 2, 90, 130, 64)
    if layout == "bnhd":
        q, k, v = (np.ascontiguousarray(np.swapaxes(x, -2, -3)).swapaxes(-2, -3) for x in (q, k, v))
    qc, kc, vc = (cp.asarray(x) for x in (q, k, v))
    if layout == "bnhd":   # the GPU arrays in that layout too, whatever cp.asarray does with it
        qc, kc, vc = (cp.ascontiguousarray(x.swapaxes(-2, -3)).swapaxes(-2, -3) for x in (qc, kc, vc))
    O, L = flash_attention(qc, kc, vc, causal=True, return_lse=True)
    (_, _), (k_same, k_ptr), (v_same, v_ptr) = seen   # q, k, v of the one launch
    assert k_same and v_same
    assert kc.data.ptr <= k_ptr < kc.data.ptr + kc.nbytes and vc.data.ptr <= v_ptr < vc.data.ptr + vc.nbytes
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), q, k, v, causal=True,
                           **kernel_rounding(plan_for(qc, kc, vc, causal=True)))
