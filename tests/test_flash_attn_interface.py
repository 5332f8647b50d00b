"""flash_attn_func: flash-attn 2's signature and conventions on (batch, seqlen, heads, d) tensors,
checked against the float64 reference on the (batch, heads, seqlen, d) transposition."""
import numpy as np
import pytest

from flashattn_cupy import flash_attention, flash_attn_func
from tolerances import assert_attention_close


def _bnhd(rng, B, Nq, Nk, H, d, Hk=None, dtype=np.float32):
    """q (B, Nq, H, d) and k, v (B, Nk, Hk, d), standard normal."""
    Hk = Hk or H
    return tuple(rng.standard_normal((B, N, h, d)).astype(dtype) for N, h in ((Nq, H), (Nk, Hk), (Nk, Hk)))


def _bhnd(x):
    return np.swapaxes(x, 1, 2)


@pytest.mark.parametrize("Nq,Nk,causal", [(1, 1, False), (33, 33, True), (50, 17, True), (17, 70, False),
                                          (113, 203, True)])
def test_against_the_reference(rng, Nq, Nk, causal):
    q, k, v = _bnhd(rng, 2, Nq, Nk, 3, 40)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and out.flags.c_contiguous and lse.shape == (2, 3, Nq)
    assert_attention_close(_bhnd(out), lse, _bhnd(q), _bhnd(k), _bhnd(v), causal=causal)


def test_positional_arguments_follow_flash_attn(rng):
    q, k, v = _bnhd(rng, 1, 20, 30, 2, 16)
    out = flash_attn_func(q, k, v, 0.0, 0.3, True)   # dropout_p, softmax_scale, causal
    expected = flash_attention(_bhnd(q), _bhnd(k), _bhnd(v), softmax_scale=0.3, causal=True)
    np.testing.assert_array_equal(out, _bhnd(expected))


def test_return_conventions(rng):
    q, k, v = _bnhd(rng, 2, 9, 9, 2, 8)
    out = flash_attn_func(q, k, v)
    out2, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)   # flash-attn's triple
    out3, lse3 = flash_attn_func(q, k, v, return_lse=True)
    assert probs is None and lse.dtype == np.float32
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse3)
    np.testing.assert_array_equal(out, flash_attn_func(q, k, v, deterministic=True))


def test_causal_window_is_causal(rng):
    q, k, v = _bnhd(rng, 1, 40, 60, 2, 16)
    np.testing.assert_array_equal(flash_attn_func(q, k, v, window_size=(-1, 0)),
                                  flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("window_size, causal, softcap, alibi", [
    ((8, 0), False, 0.0, None), ((5, 3), False, 0.0, None), ((0, 0), True, 0.0, None), ((-1, 2), False, 0.0, None),
    ((-1, -1), True, 3.0, None), ((-1, -1), False, 0.0, "heads"), ((4, 4), True, 2.0, "batch"),
])
def test_windows_softcap_and_alibi(rng, window_size, causal, softcap, alibi):
    """flash-attn's meanings: window_size (left, right) bottom-right aligned, causal sets right
    to 0; softcap; ALiBi slopes (nheads,) or (batch, nheads), with GQA."""
    q, k, v = _bnhd(rng, 2, 40, 55, 6, 16, Hk=2)
    slopes = None if alibi is None else rng.uniform(0, 1, (6,) if alibi == "heads" else (2, 6)).astype(np.float32)
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window_size, softcap=softcap,
                               alibi_slopes=slopes, return_lse=True)
    window = (window_size[0], 0) if causal else window_size
    assert_attention_close(_bhnd(out), lse, _bhnd(q), _bhnd(k), _bhnd(v), window=window, softcap=softcap,
                           alibi_slopes=None if slopes is None else np.broadcast_to(slopes, (2, 6)))


def test_torch_slopes(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0, CPU)")
    q, k, v = _bnhd(rng, 2, 20, 30, 4, 16)
    slopes = rng.uniform(0, 1, 4).astype(np.float32)
    out = flash_attn_func(*map(torch.from_numpy, (q, k, v)), alibi_slopes=torch.from_numpy(slopes))
    np.testing.assert_array_equal(out.numpy(), flash_attn_func(q, k, v, alibi_slopes=slopes))


@pytest.mark.parametrize("H,Hk", [(6, 2), (4, 1)])
def test_grouped_and_multi_query(rng, H, Hk):
    q, k, v = _bnhd(rng, 2, 25, 31, H, 32, Hk=Hk)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    group = H // Hk
    for h in range(H):   # query head h reads key/value head h // group, as in flash-attn
        kh, vh = k[:, :, h // group], v[:, :, h // group]
        assert_attention_close(out[:, :, h], lse[:, h], q[:, :, h], kh, vh, causal=True)


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0, CPU)")
    q, k, v = _bnhd(rng, 2, 30, 30, 4, 64, Hk=2)
    out = flash_attn_func(*map(torch.from_numpy, (q, k, v)), causal=True)
    assert isinstance(out, torch.Tensor) and out.is_contiguous()
    np.testing.assert_array_equal(out.view(2, 30, -1).numpy(), flash_attn_func(q, k, v, causal=True).reshape(2, 30, -1))


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(dropout_p=0.1), ValueError, "dropout is not supported"),
    (dict(dropout_p="0"), TypeError, "dropout_p must be a number"),
    (dict(window_size=(-2, 8)), ValueError, "window_size=(-2, 8): each side must be >= 0"),
    (dict(window_size=5), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(-1.0, -1.0)), TypeError, "window_size must be a pair of ints"),
    (dict(softcap=-1.0), ValueError, "softcap must be 0 (off) or a positive finite number"),
    (dict(softcap="30"), TypeError, "softcap must be a real number"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, "alibi_slopes must have shape (2,)"),
    (dict(causal=1), TypeError, "causal must be True or False"),
    (dict(deterministic=None), TypeError, "deterministic must be True or False"),
    (dict(return_attn_probs=True, return_lse=True), ValueError, "not both"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite"),
])
def test_errors(rng, kwargs, exc, words):
    with pytest.raises(exc) as info:
        flash_attn_func(*_bnhd(rng, 1, 8, 8, 2, 16), **kwargs)
    assert words in str(info.value)


def test_shape_errors(rng):
    q, k, v = _bnhd(rng, 1, 8, 8, 6, 16, Hk=4)
    with pytest.raises(ValueError, match=r"nheads of q \(6\) must be a multiple of nheads of k and v \(4\)"):
        flash_attn_func(q, k, v)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, nheads, headdim\)"):
        flash_attn_func(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attn_func(q, k, v[:, :4])


@pytest.mark.gpu
def test_cuda_reads_the_layout_in_place(rng, cp, monkeypatch):
    from flashattn_cupy import _cuda_backend
    copied = []
    strides = _cuda_backend._strides

    def spy(x, cp_):
        y, st = strides(x, cp_)
        copied.append(y is not x)
        return y, st

    monkeypatch.setattr(_cuda_backend, "_strides", spy)
    q, k, v = _bnhd(rng, 2, 70, 90, 4, 64)
    out, lse = flash_attn_func(*map(cp.asarray, (q, k, v)), causal=True, return_lse=True)
    assert copied[:3] == [False, False, False]                # q, k, v read through their strides
    assert isinstance(out, cp.ndarray) and out.flags.c_contiguous and out.shape == q.shape
    assert_attention_close(_bhnd(cp.asnumpy(out)), cp.asnumpy(lse), _bhnd(q), _bhnd(k), _bhnd(v), causal=True)


@pytest.mark.gpu
def test_cuda_torch_half(rng, cp):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA device")
    q, k, v = (torch.from_numpy(x).cuda().half() for x in _bnhd(rng, 2, 100, 100, 8, 128, Hk=2))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.is_cuda and out.dtype == torch.float16 and out.shape == q.shape and lse.shape == (2, 8, 100)
    kk, vv = (x.repeat_interleave(4, dim=2) for x in (k, v))
    ref = [_bhnd(x.float().cpu().numpy()) for x in (q, kk, vv)]
    assert_attention_close(_bhnd(out.float().cpu().numpy()), lse.cpu().numpy(), *ref, causal=True, out="float16")
