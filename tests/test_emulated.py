"""Every variant of the CUDA-core kernels (flash_fwd_simt.cu, flash_fwd_fma.cu) that the planner
emits for the devices in cases.DEVICE_LIMITS runs here, without a GPU: their own source on the
CPU (emulated.py), launched by _cuda_backend as on a device, against the float64 reference with
the bounds of tolerances.py (fp32 arithmetic, outputs rounded to the input type) and against the
C twin. Sizes cross tile edges (75 and 101 rows or keys, d inside its bound, not on it), k/v
have one head for two q heads (GQA), and each mask variant gets what it exists for: MASK 1 a
window or causal with rows that see no key (O = 0, L = -inf), MASK 2 softcap and ALiBi."""
import functools

import numpy as np
import pytest

import emulated
from backends import np_dtype
from cases import DEVICE_LIMITS, inputs
from flashattn_cupy import flash_attention, kernels, planner
from tolerances import assert_attention_close, bounds

pytestmark = pytest.mark.skipif(emulated.unavailable_reason() is not None, reason=str(emulated.unavailable_reason()))


def _emulable(name: str) -> bool:
    return kernels.family(name) in emulated.FAMILIES


@functools.cache
def variants() -> dict:
    """name -> (arch, smem_limit, dtype, mask, d) of a call that plans it, d the middle one of
    the head dims that do (so it is padded up to the bound, unless the bound is all it takes)."""
    found = {}
    for arch, limits in DEVICE_LIMITS.items():
        for limit in limits:
            for dtype in planner.CUDA_TYPES:
                for mask in planner.MASKS:
                    for d in range(1, planner.MAX_HEAD_DIM + 1):
                        name = planner.plan(1, 1, d, dtype=dtype, window=mask >= 1, score_mod=mask == 2,
                                            smem_limit=limit, arch=arch, fp32="simt", decode=False).kernel
                        if _emulable(name):
                            found.setdefault(name, (arch, limit, dtype, mask, []))[4].append(d)
    return {name: (arch, limit, dtype, mask, ds[len(ds) // 2]) for name, (arch, limit, dtype, mask, ds) in found.items()}


def test_the_variants_are_all_the_planner_emits():
    emitted = {n for arch, limits in DEVICE_LIMITS.items() for limit in limits
               for n in planner.cuda_variants(limit, arch) if _emulable(n)}
    assert emitted and emitted == set(variants())


@pytest.mark.parametrize("name", sorted(variants()))
def test_variant_on_the_cpu(name, rng, monkeypatch):
    arch, limit, dtype, mask, d = variants()[name]
    emulated.use(monkeypatch)
    Nq, Nk = (101, 75) if mask == 1 else (75, 101)
    q, k, v = inputs(rng, (2, 2), Nq, Nk, d, dtype=np_dtype(dtype))
    k, v = k[:, :1], v[:, :1]   # GQA: one k/v head for the two q heads
    options = {}
    if mask == 1:   # rows 0..23 (of 101, against 75 keys, bottom-right aligned) see no key either way
        options = dict(causal=True) if sum(map(ord, name)) % 2 else dict(window=(9, 2))
    elif mask == 2:
        options = dict(causal=True, softcap=1.5, alibi_slopes=rng.uniform(0.05, 0.5, (2, 2)).astype(np.float32))
    O, L, plan = emulated.attention(q, k, v, arch=arch, smem_limit=limit, **options)
    assert plan.kernel == name
    assert_attention_close(O, L, q, k, v, **options)   # fp32 arithmetic, O rounded to q's type
    if dtype == "float32":   # and the C twin, each within its bound of float64, within their sum
        O_c, L_c = flash_attention(q, k, v, return_lse=True, backend="c", **options)
        tol_O, tol_L = bounds(q, k, v, softcap=options.get("softcap", 0.0), alibi_slopes=options.get("alibi_slopes"))
        assert np.abs(O - O_c).max() <= 2 * tol_O
        np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_c))
        finite = np.isfinite(L_c)
        assert np.abs(L[finite] - L_c[finite]).max() <= 2 * tol_L
