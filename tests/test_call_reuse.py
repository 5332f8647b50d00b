"""Repeated CuPy calls reuse the first one's validated plan and launch arguments (api._CALLS):
the same results, bit for bit, and nothing that validation or planning would decide differently
is reused: other layouts, dtypes, options (down to their types), planner defaults."""
import numpy as np
import pytest

from backends import np_dtype
from cases import inputs
from flashattn_cupy import api, flash_attention, plan_for, planner
from tolerances import assert_attention_close, kernel_rounding

pytestmark = pytest.mark.gpu


@pytest.fixture
def calls(monkeypatch):
    """Counts how often a call is validated (api's kept calls start empty: conftest.fresh_calls)."""
    validated = []
    validate = api.validate

    def counting(*args, **kwargs):
        validated.append(1)
        return validate(*args, **kwargs)
    monkeypatch.setattr(api, "validate", counting)
    return validated


@pytest.mark.parametrize("Nq, Nk, causal", [(77, 203, False), (203, 77, True), (1, 4096, False), (4, 2048, True)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_repeated_call_is_validated_once_and_gives_the_same_bits(cp, rng, calls, Nq, Nk, causal, dtype):
    """(1, 4096) and (4, 2048): split-KV decoding in fp16, its two launches reused too."""
    q, k, v = (cp.asarray(x) for x in inputs(rng, (2, 4), Nq, Nk, 40, dtype=np.dtype(dtype)))
    O1, L1 = flash_attention(q, k, v, causal=causal, return_lse=True)
    q2, k2, v2 = (x.copy() for x in (q, k, v))   # other arrays, same shapes, strides, dtype, device
    O2, L2 = flash_attention(q2, k2, v2, causal=causal, return_lse=True)
    assert flash_attention(q2, k2, v2, causal=causal).shape == q.shape   # no L this time: the same key
    assert len(calls) == 1 and len(api._CALLS) == 1
    assert cp.array_equal(O1, O2) and cp.array_equal(L1, L2)
    assert_attention_close(cp.asnumpy(O2), cp.asnumpy(L2), *(cp.asnumpy(x) for x in (q, k, v)), causal=causal,
                           **kernel_rounding(plan_for(q, k, v, causal=causal)))


def test_what_validation_reads_is_in_the_key(cp, rng, calls):
    q, k, v = (cp.asarray(x) for x in inputs(rng, (2, 3), 64, 96, 32, dtype=np.float16))
    flash_attention(q, k, v, causal=True)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="causal must be True or False"):   # 1 == True, but refused
        flash_attention(q, k, v, causal=1)
    flash_attention(q, k, v, causal=False)                  # another option
    flash_attention(q, k, v, causal=True, softmax_scale=0.5)
    flash_attention(q, k, v, causal=True, window=[8, 0])   # unhashable: not kept, still right
    flash_attention(q, k, v, causal=True, window=[8, 0])
    assert len(calls) == 6 and len(api._CALLS) == 3
    with pytest.raises(TypeError, match="same dtype"):
        flash_attention(q, k.astype(cp.float32), v, causal=True)
    t = cp.asarray(rng.standard_normal((2, 96, 3, 32))).astype(cp.float16).swapaxes(1, 2)
    assert t.shape == k.shape and t.strides != k.strides    # the same shape, another layout
    O, L = flash_attention(q, t, t, causal=True, return_lse=True)
    assert len(api._CALLS) == 4
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), cp.asnumpy(q), cp.asnumpy(t), cp.asnumpy(t), causal=True,
                           **kernel_rounding(plan_for(q, t, t, causal=True)))
    before = len(api._CALLS)
    with planner.wgmma_default(not planner.WGMMA_BY_DEFAULT):   # planner defaults are read too
        flash_attention(q, k, v, causal=True)
    assert len(api._CALLS) == before + 1
    flash_attention(q, k, v, window=(1, 0))
    with pytest.raises(TypeError, match="window"):          # (True, 0) == (1, 0), but refused
        flash_attention(q, k, v, window=(True, 0))


def test_copied_inputs_are_copied_on_every_call(cp, rng, calls):
    """A layout the kernels cannot read (last dim strided) is copied by each call, the kept one too."""
    q, k, v = (cp.asarray(x) for x in inputs(rng, (2,), 50, 70, 64, dtype=np.float16))
    qt = cp.asfortranarray(q)
    assert qt.strides[-1] != qt.itemsize
    first = flash_attention(qt, k, v)
    qt[...] = cp.flip(q, axis=1)                            # new values in the same array
    second = flash_attention(qt, k, v)
    assert len(calls) == 1
    assert cp.array_equal(second, flash_attention(cp.ascontiguousarray(qt), k, v))
    assert not cp.array_equal(first, second)


@pytest.mark.parametrize("dtype, Nq, kernels", [("float16", 1, 3), ("float32", 1, 2), ("bfloat16", 3, 2)])
def test_a_growing_kv_cache_is_validated_once_and_planned_per_step(cp, rng, calls, monkeypatch, dtype, Nq, kernels):
    """A decoding loop: k and v are slices of a cache one key longer each step (new shapes, the
    same strides). Each step re-makes the kept call for its Nk (api._GROWING) without validating
    again, and must equal a call validated afresh, bit for bit: across the window's clamping
    (left 100 covers every key up to Nk = 101) and, in fp16, the planner's switch to split-KV
    decoding at DECODE_MIN_KEYS keys, which changes the kernel. kernels: how many the steps run
    (with Nq = 3 the window's right side masks keys whatever Nk, and fp32 does not decode)."""
    from flashattn_cupy import _cuda_backend
    made = []
    for_keys = _cuda_backend.Call.for_keys

    def spying(self, *args):
        made.append(for_keys(self, *args))
        return made[-1]
    monkeypatch.setattr(_cuda_backend.Call, "for_keys", spying)
    q = cp.asarray(rng.standard_normal((2, 8, Nq, 40)).astype(np_dtype(dtype)))   # GQA: 8 q heads over 2
    k_cache, v_cache = (cp.asarray(rng.standard_normal((2, 2, 600, 40)).astype(np_dtype(dtype))) for _ in range(2))
    steps = [*range(97, 106), *range(planner.DECODE_MIN_KEYS - 3, planner.DECODE_MIN_KEYS + 4)]
    grown = [flash_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], window=(100, 0), return_lse=True)
             for n in steps]
    assert len(calls) == 1 and len(made) == len(steps) - 1 and len(api._CALLS) == 1
    ran = set()
    for n, (O, L), call in zip(steps, grown, [None, *made]):
        k, v = k_cache[:, :, :n], v_cache[:, :, :n]
        api._CALLS.clear()
        api._GROWING.clear()
        fresh = flash_attention(q, k, v, window=(100, 0), return_lse=True)
        plan = plan_for(q, k, v, window=(100, 0))
        assert call is None or call.plan == plan
        ran.add(plan.kernel)
        assert cp.array_equal(O, fresh[0]) and cp.array_equal(L, fresh[1]), n
        if n in (steps[0], steps[-1]):
            assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (q, k, v)),
                                   window=(100, 0), **kernel_rounding(plan))
    assert len(ran) == kernels


def test_a_growing_cache_still_refuses_what_validation_refuses(cp, rng, calls):
    """The re-made call checks what depends on Nk alone; what it cannot take goes to validation."""
    q = cp.asarray(rng.standard_normal((2, 1, 64))).astype(cp.float16)
    cache = cp.asarray(rng.standard_normal((2, 300, 64))).astype(cp.float16)
    flash_attention(q, cache[:, :100], cache[:, :100])
    with pytest.raises(ValueError, match="empty dimension"):
        flash_attention(q, cache[:, :0], cache[:, :0])
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, cache[:, :101], cache[:, :102])
    strided = cp.asarray(rng.standard_normal((2, 300, 128))).astype(cp.float16)[..., ::2]   # copied by each call
    flash_attention(q, strided[:, :100], strided[:, :100])
    before = len(calls)
    O = flash_attention(q, strided[:, :101], strided[:, :101])   # validated again: its copies' strides follow Nk
    assert len(calls) == before + 1
    expected = flash_attention(q, *(cp.ascontiguousarray(strided[:, :101]) for _ in range(2)))
    assert cp.array_equal(O, expected)
