"""The CUDA kernels on a real GPU, against the float64 reference and against the C twin."""
import dataclasses

import numpy as np
import pytest

from cases import HEAD_DIMS, inputs, size_cases
from flashattn_cupy import _cuda_backend, flash_attention, plan_for, planner, reference
from flashattn_cupy._validate import validate
from tolerances import assert_attention_close, bounds, kernel_rounding

pytestmark = pytest.mark.gpu
KB = 1024


def _dtype(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name)


def _check(cp, q, k, v, allow_tf32=False, fp32_kernel="auto", **kw):
    """Run on CuPy copies of NumPy q, k, v; the result must be CuPy, of q's dtype, and close."""
    args = [cp.asarray(x) for x in (q, k, v)]
    fp32 = dict(allow_tf32=allow_tf32, fp32_kernel=fp32_kernel) if q.dtype == np.float32 else {}
    O, L = flash_attention(*args, return_lse=True, **kw, **fp32)
    assert isinstance(O, cp.ndarray) and isinstance(L, cp.ndarray)
    assert O.dtype == q.dtype and L.dtype == np.float32
    return assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), q, k, v, **kw,
                                  **kernel_rounding(plan_for(*args, **kw, **fp32)))


def _check_plan(cp, q, k, v, causal=False, **plan_kwargs):
    """Run NumPy q, k, v through the plan made with plan_kwargs (another device's limits or arch)."""
    q, k, v = (cp.asarray(x) for x in (q, k, v))
    problem = validate(q, k, v, causal=causal, softmax_scale=None, return_lse=True, backend="cuda")
    plan = planner.plan(problem.Nq, problem.Nk, problem.d, dtype=problem.dtype, causal=causal,
                        batch=problem.batch, heads=problem.heads, **plan_kwargs)
    O, L = _cuda_backend.run(problem, plan, q.device.id)
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (q, k, v)),
                           causal=causal, **kernel_rounding(plan))
    return plan


@pytest.mark.parametrize("fp32", ["auto", "simt", "tf32"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,d", size_cases())
def test_sizes(cp, rng, Nq, Nk, d, causal, fp32):
    """float32 through each of its kernels: 3xTF32 (auto on sm_80+), SIMT, TF32."""
    mode = dict(allow_tf32=True) if fp32 == "tf32" else dict(fp32_kernel=fp32)
    _check(cp, *inputs(rng, (), Nq, Nk, d), causal=causal, **mode)


@pytest.mark.parametrize("family", ["flash_fwd_mma", "flash_fwd_wgmma_f32_ws"])
def test_3xtf32_is_as_accurate_as_fp32_on_hard_inputs(cp, rng, family):
    """Large scores and long rows: 3xTF32's error stays within 2x the CUDA-core fp32 kernel's
    (plus 2^-24 of the output's scale, for errors at the rounding floor), on the mma kernel and
    (sm_90) the wgmma one, at each of its score-group sizes (4 k-steps at d = 64, 80 and 128, one
    group of 5 at d = 40)."""
    wgmma = family != "flash_fwd_mma"
    if wgmma and cp.cuda.Device().compute_capability != "90":
        pytest.skip("the wgmma kernels run on sm_90 only")
    for d, N, magnitude in [(64, 4096, 3.0), (128, 2048, 6.0), (80, 1500, 10.0), (40, 3000, 6.0)]:
        q, k, v = inputs(rng, (2,), N, N, d, magnitude=magnitude)
        v = v / np.float32(magnitude)
        O64, L64 = reference.attention(q, k, v, causal=True)
        err = {}
        with planner.wgmma_default(wgmma):
            for kernel in ("3xtf32", "simt"):
                args = [cp.asarray(x) for x in (q, k, v)]
                O, L = flash_attention(*args, causal=True, return_lse=True, fp32_kernel=kernel)
                err[kernel] = (np.abs(cp.asnumpy(O) - O64).max(), np.abs(cp.asnumpy(L) - L64).max())
            assert plan_for(*args, causal=True, fp32_kernel="3xtf32").kernel.split("<")[0] == family
        floor = 2.0**-24 * np.abs(O64).max(), 2.0**-24 * np.abs(L64).max()
        for i, what in enumerate("OL"):
            assert err["3xtf32"][i] <= 2 * err["simt"][i] + floor[i], (what, d, N, err)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", HEAD_DIMS + (1, 255))
def test_head_dims_and_dtypes(cp, rng, d, causal, dtype):
    _check(cp, *inputs(rng, (2,), 113, 203, d, dtype=_dtype(dtype)), causal=causal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 1023), (33, 31), (1023, 256), (256, 1023)])
def test_half_precision_sizes(cp, rng, Nq, Nk, dtype):
    _check(cp, *inputs(rng, (2,), Nq, Nk, 64, dtype=_dtype(dtype)), causal=True)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.5])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_scales(cp, rng, scale, dtype):
    """Negative (Qi negated once in shared memory), zero and large scales on the kernels that take
    d = 64 and 128 in half precision (on an H100 the wgmma kernel too)."""
    for on in (False, True):
        with planner.wgmma_default(on):
            for d in (64, 128):
                _check(cp, *inputs(rng, (2,), 200, 333, d, dtype=_dtype(dtype)), causal=True, softmax_scale=scale)


def test_batch_heads_scale_and_masked_rows(cp, rng):
    _check(cp, *inputs(rng, (2, 3), 33, 65, 40), causal=True)
    _check(cp, *inputs(rng, (2, 1, 3), 17, 31, 16), softmax_scale=-0.37)
    q, k, v = inputs(rng, (2,), 50, 20, 32)
    O, L = flash_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), causal=True, return_lse=True)
    assert (O[:, :30] == 0).all() and cp.isneginf(L[:, :30]).all() and cp.isfinite(L[:, 30:]).all()


def test_large_scores_do_not_overflow(cp, rng):
    for dtype in ("float32", "float16", "bfloat16"):
        q, k, v = inputs(rng, (2,), 64, 100, 64, dtype=_dtype(dtype), magnitude=12.0)
        _check(cp, q, k, v, causal=True)


def test_numpy_in_numpy_out(rng):
    q, k, v = inputs(rng, (2,), 70, 90, 48)
    O, L = flash_attention(q, k, v, backend="cuda", return_lse=True)
    assert type(O) is np.ndarray and type(L) is np.ndarray
    assert_attention_close(O, L, q, k, v)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_c_and_cuda_agree(cp, rng, dtype):
    """The two implementations, each within its own bound of float64, agree within the sum."""
    for causal in (False, True):
        q, k, v = inputs(rng, (2, 2), 203, 113, 80, dtype=np.dtype(dtype))
        O_c, L_c = flash_attention(q, k, v, causal=causal, return_lse=True, backend="c")
        qf, kf, vf = (x.astype(np.float32) for x in (q, k, v))
        O_g, L_g = flash_attention(qf, kf, vf, causal=causal, return_lse=True, backend="cuda")
        tol_O, tol_L = bounds(qf, kf, vf, **kernel_rounding(plan_for(qf, kf, vf, backend="cuda")))
        assert np.abs(O_c - O_g).max() <= 2 * tol_O
        np.testing.assert_array_equal(np.isneginf(L_c), np.isneginf(L_g))
        finite = np.isfinite(L_c)
        assert np.abs(L_c[finite] - L_g[finite]).max() <= 2 * tol_L


@pytest.mark.parametrize("limit", [48 * KB, 64 * KB, 100 * KB, 163 * KB, 227 * KB])
@pytest.mark.parametrize("d", [16, 64, 100, 256])
def test_every_tile_variant_runs(cp, rng, limit, d):
    """Plans made for smaller devices (other tiles, Turing's instructions) run right here too."""
    kernels = set()
    for dtype in ("float32", "float16", "bfloat16"):
        for arch in (75, 80):
            q, k, v = inputs(rng, (2,), 130, 75, d, dtype=_dtype(dtype))
            for causal in (False, True):
                kernels.add(_check_plan(cp, q, k, v, causal, smem_limit=limit, arch=arch).kernel)
    assert any(", 75, 1>" in n for n in kernels) and any(", 80, 1>" in n for n in kernels)


@pytest.mark.parametrize("arch", [75, 80, 90])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,d", size_cases())
def test_tensor_core_sizes(cp, rng, Nq, Nk, d, causal, dtype, arch):
    """Every size pair on the tensor-core kernels: Hopper's wgmma one (arch 90, where its head-dim
    bounds), the mma one with sm_80 instructions, and forced to Turing's (bf16 on Turing falls
    back to the SIMT kernel: checked too)."""
    if arch == 90 and cp.cuda.Device().compute_capability != "90":
        pytest.skip("the wgmma kernel runs on sm_90 only")
    wgmma = arch == 90 and planner.head_dim_bound(d) in (64, 128)
    plan = _check_plan(cp, *inputs(rng, (), Nq, Nk, d, dtype=_dtype(dtype)), causal,
                       smem_limit=64 * KB if arch == 75 else None, arch=arch, wgmma=wgmma or None)
    tensor_cores = arch >= 80 or dtype == "float16"
    family = "flash_fwd_wgmma" if wgmma else "flash_fwd_mma" if tensor_cores else "flash_fwd_simt"
    if planner.use_decode(Nq, Nk, 1, dtype, arch):   # split-KV decoding
        family = "flash_decode"
    assert plan.kernel.startswith(family)


@pytest.mark.parametrize("D, tiles", [(D, c) for D, candidates in planner.WGMMA_TILES for c in candidates])
def test_every_wgmma_tile_runs(cp, rng, D, tiles):
    """Each of the wgmma kernel's tile candidates (planned for the shared-memory limit it needs:
    later ones are what smaller limits get), fp16 and bf16, causal or not, on ragged sizes with
    batch and heads, d at the bound and below it."""
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("the wgmma kernel runs on sm_90 only")
    limit = planner.wgmma_smem_bytes(64 * tiles[0], tiles[1], D)
    for dtype, d in (("float16", D), ("bfloat16", D - 24)):
        for causal in (False, True):
            q, k, v = inputs(rng, (2, 3), 300, 517, d, dtype=_dtype(dtype))
            plan = _check_plan(cp, q, k, v, causal, smem_limit=limit, arch=90, wgmma=True)
            assert plan.kernel == f"flash_fwd_wgmma<{planner.CUDA_TYPES[dtype]}, {D}, {tiles[0]}, {tiles[1]}, {int(causal)}>"
            q, k, v = inputs(rng, (2,), 517, 300, d, dtype=_dtype(dtype))   # causal: rows with no key
            _check_plan(cp, q, k, v, causal, smem_limit=limit, arch=90, wgmma=True)


@pytest.mark.parametrize("dtype, wgmma", [("float16", True), ("float16", False), ("float32", True),
                                          ("float32", False)])
def test_blocks_stride_over_heads_past_the_grid(cp, rng, dtype, wgmma):
    """A grid of fewer (head, batch) slots than the call has (as past CUDA's 65535 a grid
    dimension): each block computes its Q tile for several (batch, head) pairs in turn, its
    buffers and barriers carried from one to the next. The tensor-core kernels of this device."""
    if wgmma and cp.cuda.Device().compute_capability != "90":
        pytest.skip("the wgmma kernels run on sm_90 only")
    for causal in (False, True):
        q, k, v = (cp.asarray(x) for x in inputs(rng, (3, 5), 200, 333, 64, dtype=_dtype(dtype)))
        problem = validate(q, k, v, causal=causal, softmax_scale=None, return_lse=True, backend="cuda")
        with planner.wgmma_default(wgmma):
            plan = planner.plan(200, 333, 64, dtype=dtype, causal=causal, batch=3, heads=5)
        assert plan.grid[1:] == (5, 3) and plan.kernel.startswith("flash_fwd_wgmma" if wgmma else "flash_fwd_mma")
        O, L = _cuda_backend.run(problem, dataclasses.replace(plan, grid=(plan.grid[0], 2, 2)), q.device.id)
        assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (q, k, v)), causal=causal,
                               **kernel_rounding(plan))


def test_strided_views_without_copies(cp, rng):
    bnhd = lambda N: cp.asarray(rng.standard_normal((2, N, 3, 24), dtype=np.float32))  # noqa: E731
    qt, kt, vt = (x.swapaxes(1, 2) for x in (bnhd(40), bnhd(50), bnhd(50)))  # (B, H, N, d) views
    kr = kt[:, :, ::-1]                                                   # negative row stride
    vb = cp.broadcast_to(vt[:, :1], vt.shape)                             # zero head stride
    O, L = flash_attention(qt, kr, vb, causal=True, return_lse=True)
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (qt, kr, vb)), causal=True)
    for x in (qt, kr, vb):
        assert _cuda_backend._strides(x, cp)[0] is x


def test_odd_layouts_are_copied_not_misread(cp, rng):
    q = cp.asarray(inputs(rng, (3, 2, 2), 9, 11, 8)[0]).transpose(1, 0, 2, 3, 4)  # batch dims do not collapse
    k = cp.asfortranarray(cp.asarray(inputs(rng, (2, 3, 2), 11, 11, 8)[0]))     # last dim not contiguous
    v = cp.asarray(inputs(rng, (3, 2, 2), 11, 11, 8)[0]).transpose(1, 0, 2, 3, 4)
    assert _cuda_backend._strides(q, cp)[0] is not q and _cuda_backend._strides(k, cp)[0] is not k
    O, L = flash_attention(q, k, v, return_lse=True)
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (q, k, v)))


def test_more_heads_than_a_grid_dimension(cp, rng):
    q, k, v = (cp.asarray(x) for x in inputs(rng, (70000,), 2, 3, 8))
    O, L = flash_attention(q, k, v, return_lse=True)
    assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (q, k, v)))


def test_user_stream_and_repeatability(cp, rng):
    q, k, v = (cp.asarray(x) for x in inputs(rng, (4, 4), 500, 600, 64))
    first = flash_attention(q, k, v, causal=True)
    with cp.cuda.Stream(non_blocking=True) as stream:
        again = flash_attention(q, k, v, causal=True)
        stream.synchronize()
    assert (first == again).all()   # bitwise: no atomics, fixed order


def test_float64_on_the_gpu_is_refused(cp, rng):
    q, k, v = (cp.asarray(x) for x in inputs(rng, (), 8, 8, 8, dtype=np.float64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        flash_attention(q, k, v)


@pytest.mark.parametrize("D, tiles", planner.WGMMA_F32_WS_TILES)
def test_every_wgmma_f32_ws_tile_runs(cp, rng, D, tiles):
    """The warp-specialized float32 (3xTF32) kernel at each head-dim bound, planned for the shared
    memory it needs: ragged sizes with batch and heads (several key tiles, both rings wrapping),
    causal or not, d at the bound and odd below it (the producer's element-wise loads), rows that
    see no key, one row, one key tile, no full key tile; then through the API a window with
    softcap and ALiBi, a negative scale (the producer negates Qi), a window no row of a tile sees,
    grouped k/v heads and a narrow window."""
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("the wgmma kernels run on sm_90 only")
    Bc, k_stages, v_stages = tiles
    limit = planner.wgmma_f32_ws_smem_bytes(Bc, k_stages, v_stages, D)
    for d in (D, D - 7):   # above the bound below (48 - 7 = 41 > 32)
        for causal in (False, True):
            for Nq, Nk in ((300, 517), (517, 300), (130, 100), (1, 1000), (129, 5 * Bc + 1)):
                q, k, v = inputs(rng, (2, 3), Nq, Nk, d)
                plan = _check_plan(cp, q, k, v, causal, smem_limit=limit, arch=90, wgmma=True)
                assert plan.kernel == f"flash_fwd_wgmma_f32_ws<{D}, {Bc}, {k_stages}, {v_stages}, {int(causal)}>"
    with planner.wgmma_default(True):
        q, k, v = inputs(rng, (2, 4), 190, 333, D - 8)
        alibi = rng.uniform(0.05, 1.0, (2, 4)).astype(np.float32)
        _check(cp, q, k, v, window=(60, 7), softcap=4.0, alibi_slopes=alibi)
        _check(cp, q, k, v, causal=True, softmax_scale=-0.2)
        _check(cp, q, k, v, window=(0, 0))
        q, k, v = inputs(rng, (2, 4), 300, 700, D)
        _check(cp, q, k[:, :2], v[:, :2], causal=True)   # 2 q heads a k/v head
        _check(cp, q, k, v, window=(10, 10))             # a tile's rows see 1-2 key tiles of many
        assert plan_for(*(cp.asarray(x) for x in (q, k, v)), causal=True).kernel.startswith(
            "flash_fwd_wgmma_f32_ws<")


@pytest.mark.parametrize("D, tiles", [(D, c) for D, candidates in planner.FMA_TILES for c in candidates])
def test_every_fma_tile_runs(cp, rng, D, tiles):
    """The register-tiled CUDA-core kernel (float32, fp32_kernel="simt"), each tile candidate at
    its head-dim bound, planned for the shared memory it needs: ragged sizes with batch and heads,
    causal or not, d at the bound and odd below it, rows that see no key, one row; then through the
    API a window with softcap and ALiBi, grouped k/v heads and a negative scale."""
    limit = planner.fma_smem_bytes(tiles[0], tiles[1], D)
    for d in (D, D - 27):
        for causal in (False, True):
            for Nq, Nk in ((300, 517), (517, 300), (1, 1000), (70, 5 * tiles[1] + 1)):
                q, k, v = inputs(rng, (2, 3), Nq, Nk, d)
                plan = _check_plan(cp, q, k, v, causal, smem_limit=limit, arch=80, fp32="simt")
                assert plan.kernel == f"flash_fwd_fma<{D}, {', '.join(map(str, tiles))}, {int(causal)}>"
    # through the API on this device (its own tile for D, when sm_80+)
    q, k, v = inputs(rng, (2, 4), 190, 333, D - 8)
    alibi = rng.uniform(0.05, 1.0, (2, 4)).astype(np.float32)
    _check(cp, q, k, v, window=(60, 7), softcap=4.0, alibi_slopes=alibi, fp32_kernel="simt")
    _check(cp, q, k[:, :2], v[:, :2], causal=True, softmax_scale=-0.2, fp32_kernel="simt")   # 2 q heads a k/v head
    if int(cp.cuda.Device().compute_capability) >= planner.FMA_MIN_ARCH:
        assert plan_for(*(cp.asarray(x) for x in (q, k, v)), fp32_kernel="simt").kernel.startswith("flash_fwd_fma<")
