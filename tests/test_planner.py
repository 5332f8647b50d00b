"""The planner: the seed's configuration, and plans that always fit the device."""
import math

import pytest

from flashattn_cupy import planner
from flashattn_cupy.planner import plan

KB = 1024
LIMITS = (48 * KB, 64 * KB, 99 * KB, 100 * KB, 163 * KB, 227 * KB)   # T4 .. H100
ARCHES = (75, 80, 86, 89, 90)


def test_seed_configuration_on_a_48_kb_device():
    p = plan(512, 512, 64, smem_limit=48 * KB, arch=75)
    assert (p.Br, p.Bc, p.threads, p.grid) == (32, 32, 256, (16, 1, 1))
    # the seed's layout (Qi, Kj, Vj, Sij, Pij, Oi, four row vectors) was 40.5 KB; ours keeps
    # Pij in Sij's place and pads two tiles against bank conflicts, and is smaller
    assert p.smem_bytes <= 40.5 * KB
    assert planner.seed_budget_floats(32, 32, 64) * 4 <= 48 * KB
    assert "shared memory 36.62 KB of 48.00 KB" in str(p)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("dtype", sorted(planner.CUDA_TYPES))
def test_every_plan_fits(limit, dtype, arch):
    for d in range(1, 257):
        for causal in (False, True):
            p = plan(1000, 3000, d, dtype=dtype, causal=causal, batch=3, heads=5, smem_limit=limit,
                     arch=arch)
            assert p.smem_bytes <= limit
            if "wgmma_f32_ws" in p.kernel:
                Bc, k_stages, v_stages = (int(x) for x in p.kernel.split(", ")[1:4])
                assert p.smem_bytes == planner.wgmma_f32_ws_smem_bytes(Bc, k_stages, v_stages, p.head_dim_bound)
                assert (p.Br, p.Bc, p.threads) == (128, Bc, 384)   # a producer warpgroup and two consumers
            elif "wgmma" in p.kernel:
                assert p.smem_bytes == planner.wgmma_smem_bytes(p.Br, p.Bc, p.head_dim_bound)
                assert p.threads == 2 * p.Br   # a warpgroup (128 threads) a 64-row slice
            elif "flash_fwd_fma<" in p.kernel:
                assert p.smem_bytes == planner.fma_smem_bytes(p.Br, p.Bc, p.head_dim_bound)
                assert p.threads == 4 * p.Br   # (Br / 4) x 16
            elif "mma" in p.kernel:
                itemsize = 4 if dtype == "float32" else 2
                assert p.smem_bytes == planner.mma_smem_bytes(p.Br, p.Bc, p.head_dim_bound, itemsize)
            else:
                assert p.smem_bytes == planner.simt_smem_bytes(p.Br, p.Bc, p.head_dim_bound)
            # d rounded up to the kernel's step: 16 for the mma kernel (its MMAs' width in d), else 32
            # (the warp-specialized fp32 kernel: its own bounds, the smallest that holds d)
            if p.kernel.startswith("flash_fwd_wgmma_f32_ws<"):
                assert p.head_dim_bound == planner.wgmma_f32_ws_bound(d) >= d
            else:
                step = 16 if p.kernel.startswith("flash_fwd_mma<") else 32
                assert p.head_dim_bound == step * math.ceil(d / step) <= 256
            assert p.threads % 32 == 0 and p.threads <= 1024
            assert p.grid == (math.ceil(1000 / p.Br), 5, 3)
            assert p.mask == int(causal)


@pytest.mark.parametrize("arch, dtype, fp32, family, passes", [
    (75, "float32", "auto", "simt", 0), (75, "float16", "auto", "mma", 1), (75, "bfloat16", "auto", "simt", 0),
    (75, "float32", "tf32", "simt", 0),   # TF32 is allowed, not required: Turing has none
    (80, "float32", "auto", "mma", 3), (80, "float32", "3xtf32", "mma", 3), (80, "float32", "tf32", "mma", 1),
    (90, "float32", "simt", "fma", 0), (80, "float16", "auto", "mma", 1), (86, "bfloat16", "auto", "mma", 1),
    (90, "bfloat16", "auto", "wgmma", 0), (90, "float16", "auto", "wgmma", 0), (90, "float32", "tf32", "mma", 1),
])
def test_tensor_cores_where_the_device_has_them(arch, dtype, fp32, family, passes):
    with planner.wgmma_default(True):
        p = plan(4096, 4096, 128, dtype=dtype, smem_limit=99 * KB, arch=arch, fp32=fp32)
    assert p.kernel.startswith(f"flash_fwd_{family}<")
    if family == "mma":   # the instruction set (Turing's, or sm_80's with cp.async), the passes
        assert p.kernel.endswith(f", {75 if arch < 80 else 80}, {passes}>")
        assert p.Br % (16 * p.threads // 32) == 0   # whole 16-row m-tiles per warp


def test_3xtf32_needs_sm80():
    with pytest.raises(ValueError, match="sm_80"):
        plan(64, 64, 64, smem_limit=64 * KB, arch=75, fp32="3xtf32")
    with pytest.raises(ValueError, match="fp32 must be one of"):
        plan(64, 64, 64, smem_limit=64 * KB, arch=90, fp32="fp64")


def test_fp32_tiles_fall_back_to_simt_when_none_fits():
    assert "simt" in plan(64, 64, 256, smem_limit=48 * KB, arch=90).kernel
    assert "mma" in plan(64, 64, 256, smem_limit=99 * KB, arch=90).kernel


def test_grid_never_empty_and_capped():
    assert plan(1, 1, 1, smem_limit=48 * KB, arch=90).grid == (1, 1, 1)
    p = plan(10, 10, 64, batch=70000, heads=100000, smem_limit=48 * KB, arch=90)
    assert p.grid[1:] == (65535, 65535)   # the kernel strides over the rest


def test_larger_devices_get_larger_tiles():
    assert plan(4096, 4096, 64, smem_limit=227 * KB, arch=90, fp32="simt").Br == 128
    assert plan(4096, 4096, 256, smem_limit=48 * KB, arch=90, fp32="simt").Br == 8
    half = dict(dtype="float16", arch=90)
    assert plan(4096, 4096, 128, smem_limit=227 * KB, wgmma=True, **half).Bc == 64   # two blocks an SM
    assert plan(4096, 4096, 64, smem_limit=227 * KB, wgmma=False, **half).Br == 128
    assert plan(4096, 4096, 256, smem_limit=48 * KB, **half).Bc == 16


def test_c_plan():
    p = plan(256, 256, 64, backend="c")
    assert (p.Br, p.Bc, p.kernel, p.threads) == (128, 64, "flash_fwd_f32", 1)
    assert plan(256, 256, 64, dtype="float64", backend="c").kernel == "flash_fwd_f64"
    assert (plan(9, 9, 128, backend="c").Bc, plan(9, 9, 129, backend="c").Bc) == (64, 32)
    for d in range(1, 257):   # the working set stays L2-sized: <= 512 KB in float32
        assert plan(9, 9, d, backend="c").smem_bytes <= 512 * 1024


def test_c_threads_never_exceed_the_heads():
    assert plan(9, 9, 64, batch=2, heads=3, backend="c", num_threads=4).threads == 4
    assert plan(9, 9, 64, batch=2, heads=3, backend="c", num_threads=8).threads == 6
    assert "6 threads" in str(plan(9, 9, 64, batch=2, heads=3, backend="c", num_threads=8))


@pytest.mark.parametrize("kwargs, words", [
    (dict(d=0), "head dim"), (dict(d=257), "head dim"), (dict(Nq=0), ">= 1"),
    (dict(dtype="float64"), "CUDA backend takes"), (dict(backend="c", dtype="float16"), "C backend takes"),
    (dict(backend="tpu"), "backend"), (dict(num_threads=2), "C backend only"),
    (dict(backend="c", num_threads=0), ">= 1"),
])
def test_plan_errors(kwargs, words):
    args = dict(Nq=8, Nk=8, d=64, smem_limit=48 * KB, arch=90) | kwargs
    with pytest.raises(ValueError, match=words):
        plan(args.pop("Nq"), args.pop("Nk"), args.pop("d"), **args)


def test_variants_cover_every_head_dim_bound():
    names = planner.cuda_variants(48 * KB, 75)
    # (head-dim bounds: fp16's mma kernel 16 (a step of 16), fp32 and bf16 on the CUDA cores 8 each
    # (a step of 32)) x masks
    assert len(names) == (16 + 8 + 8) * 3
    assert "flash_fwd_simt<float, 32, 32, 64, 256, 0>" in names
    assert "flash_fwd_mma<fa_bfloat16, 128, 4, 2, 64, 1, 80, 1>" in planner.cuda_variants(227 * KB, 90)


@pytest.mark.parametrize("causal, window, score_mod, mask", [
    (False, False, False, 0), (True, False, False, 1), (False, True, False, 1), (True, True, False, 1),
    (False, False, True, 2), (True, True, True, 2),
])
def test_mask_variant(causal, window, score_mod, mask):
    """MASK (csrc/fa_mask.cuh): 0 nothing masked, 1 a window (causal is one), 2 also score mods."""
    for dtype, fp32 in (("float16", "auto"), ("float32", "3xtf32"), ("float32", "simt")):
        p = plan(100, 100, 64, dtype=dtype, causal=causal, window=window, score_mod=score_mod,
                 smem_limit=227 * KB, arch=90, fp32=fp32)
        assert p.mask == mask and p.causal == causal
        # the MASK template argument: the mma kernel's sixth, the others' last
        args = p.kernel.split("<")[1].rstrip(">").split(", ")
        assert int(args[5] if p.kernel.startswith("flash_fwd_mma") else args[-1]) == mask


def test_decoding_is_chosen_by_default_and_can_be_turned_off():
    """A token against a 32k KV cache decodes by default; decode_default(False) gives the
    one-pass kernel for the calls in its block (bench --decode's comparison), and restores."""
    shape = dict(dtype="float16", batch=8, heads=32, group=4, smem_limit=227 * 1024, arch=90, sm_count=132)
    assert planner.plan(1, 32768, 128, **shape).kernel.startswith("flash_decode<")
    with planner.decode_default(False):
        p = planner.plan(1, 32768, 128, **shape)
        assert p.kernel.startswith(("flash_fwd_mma", "flash_fwd_wgmma")) and p.splits == 0
    assert planner.DECODE_BY_DEFAULT and planner.plan(1, 32768, 128, **shape).splits == 2   # 128 of 132 blocks


@pytest.fixture
def wgmma_on():
    with planner.wgmma_default(True):
        yield


def test_wgmma_only_where_it_runs(wgmma_on):
    """Hopper's wgmma kernels (when on by default): sm_90 exactly (sm_90a instructions, not carried
    to later GPUs), fp16/bf16, head-dim bounds 64 and 128; elsewhere the mma kernel, as with
    wgmma=False."""
    H100 = dict(smem_limit=227 * KB, batch=2, heads=4)
    for dtype in ("float16", "bfloat16"):
        for d in (33, 64, 97, 128):
            p = plan(1000, 1000, d, dtype=dtype, arch=90, **H100)
            tiles = planner.wgmma_tiles(p.head_dim_bound, H100["smem_limit"])
            assert tiles == next(c for D, c in planner.WGMMA_TILES if D == p.head_dim_bound)[0]   # the first fits
            assert p.kernel == f"flash_fwd_wgmma<{planner.CUDA_TYPES[dtype]}, {p.head_dim_bound}, {tiles[0]}, {tiles[1]}, 0>"
            assert (p.Br, p.Bc, p.threads) == (64 * tiles[0], tiles[1], 128 * tiles[0])
            assert plan(1000, 1000, d, dtype=dtype, arch=90, wgmma=False, **H100).kernel.startswith("flash_fwd_mma<")
        for d in (32, 96, 160, 256):
            assert plan(1000, 1000, d, dtype=dtype, arch=90, **H100).kernel.startswith("flash_fwd_mma<")
        for arch in (80, 89, 100, 120):
            assert plan(1000, 1000, 64, dtype=dtype, arch=arch, **H100).kernel.startswith("flash_fwd_mma<")
    assert plan(1000, 1000, 64, arch=90, **H100).kernel.startswith("flash_fwd_wgmma_f32_ws<")   # fp32: 3xTF32
    # each candidate is what some smaller limit gets (each needs less than those before it), then none: mma
    for D, candidates in planner.WGMMA_TILES:
        for groups, Bc in candidates:
            limit = planner.wgmma_smem_bytes(64 * groups, Bc, D)
            first = next(c for c in candidates if planner.wgmma_smem_bytes(64 * c[0], c[1], D) <= limit)
            assert first == (groups, Bc), "a candidate no limit reaches: drop it"
            p = plan(9, 9, D, dtype="float16", arch=90, smem_limit=limit)
            assert p.kernel == f"flash_fwd_wgmma<fa_half, {D}, {groups}, {Bc}, 0>"
            # the kernel's launch bounds ask for two blocks an SM: their registers (128 a thread at
            # two warpgroups) and their shared memory must fit one
            assert groups <= 2 and 2 * (limit + 1024) <= planner.WGMMA_SM_SMEM
        smallest = min(planner.wgmma_smem_bytes(64 * c[0], c[1], D) for c in candidates)
        assert plan(9, 9, D, dtype="float16", arch=90, smem_limit=smallest - 1).kernel.startswith("flash_fwd_mma<")


def test_wgmma_f32_only_as_3xtf32_at_its_bounds(wgmma_on):
    """float32 on sm_90: 3xTF32 ("auto", "3xtf32") runs on the warp-specialized fp32 wgmma kernel
    at head-dim bounds 40, 48, 64, 96 and 128 (its shared memory, one block an SM, fits an H100's limit);
    below that limit on the mma kernel. TF32, the CUDA-core kernel, other bounds, other GPUs and
    wgmma=False keep the kernels they had."""
    H100 = dict(smem_limit=227 * KB, batch=2, heads=4)
    for fp32 in ("auto", "3xtf32"):
        for d in (33, 40, 41, 64, 65, 80, 96, 97, 128):
            p = plan(1000, 1000, d, arch=90, fp32=fp32, causal=True, **H100)
            D = p.head_dim_bound
            Bc, k_stages, v_stages = dict(planner.WGMMA_F32_WS_TILES)[D]
            assert p.kernel == f"flash_fwd_wgmma_f32_ws<{D}, {Bc}, {k_stages}, {v_stages}, 1>"
            assert (p.Br, p.Bc, p.threads, p.grid) == (128, Bc, 384, (8, 4, 2))
            ws = planner.wgmma_f32_ws_smem_bytes(Bc, k_stages, v_stages, D)
            assert planner.WGMMA_SM_SMEM < 2 * (ws + 1024) and ws + 1024 <= planner.WGMMA_SM_SMEM   # one block an SM
            assert plan(1000, 1000, d, arch=90, fp32=fp32, wgmma=False, **H100).kernel.startswith("flash_fwd_mma<")
            assert D == min(b for b in (40, 48, 64, 96, 128) if b >= d)   # bounds 40, 48, then steps of 32
            below = plan(1000, 1000, d, arch=90, fp32=fp32, causal=True, **dict(H100, smem_limit=ws - 1))
            assert below.kernel.startswith("flash_fwd_mma<")
            with pytest.raises(ValueError, match="wgmma"):
                plan(1000, 1000, d, arch=90, fp32=fp32, wgmma=True, **dict(H100, smem_limit=ws - 1))
        for d in (32, 129, 160, 256):
            assert plan(1000, 1000, d, arch=90, fp32=fp32, **H100).kernel.startswith("flash_fwd_mma<")
        assert plan(1000, 1000, 64, arch=80, fp32=fp32, **H100).kernel.startswith("flash_fwd_mma<")
    assert plan(1000, 1000, 64, arch=90, fp32="tf32", **H100).kernel.startswith("flash_fwd_mma<")
    assert plan(1000, 1000, 64, arch=90, fp32="simt", **H100).kernel.startswith("flash_fwd_fma<")
    with pytest.raises(ValueError, match="float32 as 3xTF32"):
        plan(9, 9, 64, arch=90, fp32="tf32", wgmma=True, **H100)


def test_wgmma_can_be_forced_refused_or_turned_off():
    half = dict(dtype="float16", smem_limit=227 * KB)
    with pytest.raises(ValueError, match="sm_90"):
        plan(9, 9, 64, arch=80, wgmma=True, **half)
    with pytest.raises(ValueError, match="d in 33..64 or 97..128"):
        plan(9, 9, 80, arch=90, wgmma=True, **half)
    assert plan(9, 9, 64, arch=90, wgmma=True, **half).kernel.startswith("flash_fwd_wgmma<")
    for on in (False, True):
        with planner.wgmma_default(on):
            family = "flash_fwd_wgmma<" if on else "flash_fwd_mma<"
            assert plan(9, 9, 64, arch=90, **half).kernel.startswith(family)
            assert plan(9, 9, 64, arch=90, wgmma=True, **half).kernel.startswith("flash_fwd_wgmma<")
            assert plan(9, 9, 64, arch=90, wgmma=False, **half).kernel.startswith("flash_fwd_mma<")


@pytest.mark.parametrize("arch", (80, 86, 90))
def test_cuda_cores_run_the_register_tiled_kernel_where_it_fits(arch):
    """float32 on the CUDA cores (fp32="simt") from sm_80: flash_fwd_fma.cu with the first of its
    candidates that fits, (Br / RM) x 16 threads; where none fits, and on Turing (until the kernel
    has been measured there), flash_fwd_simt.cu as before."""
    for d in range(8, 257, 8):
        D = planner.head_dim_bound(d)
        for limit in LIMITS:
            p = plan(1000, 777, d, smem_limit=limit, arch=arch, fp32="simt")
            tiles = planner.fma_tiles(D, limit)
            if tiles is None:
                assert p.kernel.startswith("flash_fwd_simt<")
                continue
            Br, Bc, rm = tiles
            assert p.kernel == f"flash_fwd_fma<{D}, {Br}, {Bc}, {rm}, 0>"
            assert (p.Br, p.Bc, p.threads, p.grid) == (Br, Bc, Br // rm * 16, (math.ceil(1000 / Br), 1, 1))
            assert p.smem_bytes == planner.fma_smem_bytes(Br, Bc, D) <= limit
            candidates = next(c for d_max, c in planner.FMA_TILES if D <= d_max)
            assert tiles == next(t for t in candidates if planner.fma_smem_bytes(t[0], t[1], D) <= limit)
    # the sizes the tile table was chosen for; every candidate is what some device's limit gets
    reached = {(p.head_dim_bound, p.Br, p.Bc, p.Br * 16 // p.threads) for limit in LIMITS for d in range(8, 257, 8)
               if (p := plan(9, 9, d, smem_limit=limit, arch=arch, fp32="simt")).kernel.startswith("flash_fwd_fma<")}
    assert {(D, *t) for D, c in planner.FMA_TILES for t in c} <= reached   # (at each candidate's largest D)
    assert planner.fma_tiles(64, 227 * KB) == (128, 64, 8) and planner.fma_tiles(64, 99 * KB) == (64, 64, 8)
    assert planner.fma_tiles(128, 227 * KB) == (128, 64, 8)
    assert planner.fma_tiles(64, 48 * KB) == (64, 32, 4) and planner.fma_tiles(128, 163 * KB) == (64, 32, 4)
    assert planner.fma_tiles(128, 64 * KB) is None
    assert planner.fma_tiles(256, 227 * KB) == (32, 32, 4) and planner.fma_tiles(256, 99 * KB) is None
    assert plan(512, 512, 64, smem_limit=48 * KB, arch=75).kernel.startswith("flash_fwd_simt<")   # the seed's
