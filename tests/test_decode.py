"""Split-KV decoding (csrc/flash_decode.cu): the planner's choice, the split arithmetic and the
launch plumbing on the CPU (kernel_model.py reads the two launches as the kernels do), and on a
GPU the kernels against the float64 reference and against the one-pass kernel.

The GPU checks are two: the worst-case bounds of tolerances.py (kernel_rounding gives the
splits), and a sharper, data-driven one, since those bounds grow with Nk u and at Nk = 33000
would not see a dropped key tile: the decoding error against the float64 reference must stay
within 3x the one-pass tensor-core kernel's error on the same inputs (plus a floor of half an
ulp of the output type), which a lost, doubled or misplaced tile of 64 keys exceeds many times.
"""
import dataclasses
import math

import numpy as np
import pytest

import kernel_model
from backends import np_dtype
from flashattn_cupy import _cuda_backend, flash_attention, merge_attention, plan_for, planner, reference
from flashattn_cupy._validate import validate
from tolerances import UNIT_ROUNDOFF, assert_attention_close, kernel_rounding

KB = 1024
H100 = dict(smem_limit=227 * KB, arch=90, sm_count=132)
DEVICES = [(75, 64 * KB), (80, 48 * KB), (80, 99 * KB), (80, 163 * KB), (86, 99 * KB), (90, 227 * KB)]


# --- the planner --------------------------------------------------------------------------------


@pytest.mark.parametrize("Nq, Nk, group, dtype, arch, chosen", [
    (1, 32768, 4, "float16", 90, True), (4, 32768, 4, "bfloat16", 80, True), (16, 256, 1, "float16", 86, True),
    (1, 131072, 8, "float16", 90, True), (2, 5000, 8, "float16", 90, True),
    (17, 32768, 1, "float16", 90, False),    # more rows than one m16 tile
    (4, 32768, 8, "float16", 90, False),     # group * Nq = 32
    (1, 255, 1, "float16", 90, False),       # too few keys to pay for a second launch
    (1, 32768, 1, "float32", 90, False),     # fp32 keeps its kernels
    (1, 32768, 1, "float16", 75, False),     # Turing: no cp.async, no m16n8k16 bf16
])
def test_when_decoding_is_chosen(Nq, Nk, group, dtype, arch, chosen):
    assert planner.use_decode(Nq, Nk, group, dtype, arch) == chosen
    p = planner.plan(Nq, Nk, 128, dtype=dtype, batch=2, heads=8 * group, group=group, smem_limit=99 * KB,
                     arch=arch, sm_count=100)
    assert p.kernel.startswith("flash_decode<") == chosen == (p.splits > 0)
    if chosen:
        assert p.combine in ("", f"flash_decode_combine<{planner.CUDA_TYPES[dtype]}>")
        assert p.grid == (p.splits, 8, 2) and p.Br == 16 and p.threads == 32 * (p.Bc // 16)
        assert f"{p.splits} key split" in str(p)


def test_decode_can_be_forced_or_refused():
    args = dict(dtype="float16", batch=2, heads=8, group=4, **H100)
    assert planner.plan(1, 7, 64, decode=True, **args).splits >= 1          # too few keys to choose it
    assert planner.plan(1, 32768, 64, decode=False, **args).kernel.startswith(("flash_fwd_mma", "flash_fwd_wgmma"))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        planner.plan(1, 4096, 64, **{**args, "dtype": "float32"}, decode=True)
    with pytest.raises(ValueError, match="sm_80"):
        planner.plan(1, 4096, 64, **{**args, "arch": 75}, decode=True)
    with pytest.raises(ValueError, match="group \\* Nq = 20"):
        planner.plan(5, 4096, 64, **args, decode=True)
    with pytest.raises(ValueError, match="CUDA backend only"):
        planner.plan(1, 4096, 64, backend="c", decode=True)
    with pytest.raises(ValueError, match="group dividing heads"):
        planner.plan(1, 4096, 64, dtype="float16", heads=6, group=4, **H100)


@pytest.mark.parametrize("arch, limit", [(a, lim) for a, lim in DEVICES if a >= 80])
def test_every_decode_plan_fits(arch, limit):
    for d in range(1, 257, 3):
        for dtype in planner.DECODE_DTYPES:
            for page in planner.DECODE_PAGES:
                p = planner.plan(1, 4096, d, dtype=dtype, batch=3, heads=8, group=8, smem_limit=limit, arch=arch,
                                 sm_count=108, page=page)
                NW, BC, stages = (int(x) for x in p.kernel.rstrip(">").split(", ")[2:5])
                assert p.smem_bytes == planner.decode_smem_bytes(NW, BC, stages, p.head_dim_bound) <= limit
                assert BC % (16 * NW) == 0 and p.threads == 32 * NW and stages >= 2   # 16k keys a warp
                assert p.Bc == BC
                if 0 < page < BC:   # pages shorter than the tile: few rows a thread, where such a tile fits
                    short = [c for c in next(c for D, c in planner.DECODE_TILES if p.head_dim_bound <= D)
                             if planner.decode_smem_bytes(*c, p.head_dim_bound) <= limit and (page >= c[1] or (
                                 c[1] <= planner.DECODE_PAGED_MAX_BC and c[0] >= planner.DECODE_PAGED_MIN_WARPS))]
                    assert (NW, BC, stages) == (short[0] if short else (NW, BC, stages))
            assert p.workspace_bytes == 4 * 3 * 8 * 1 * p.splits * (p.head_dim_bound + 1)
            assert 1 <= p.splits <= planner.DECODE_MAX_SPLITS


def test_the_bench_shapes_fill_an_h100():
    """The benchmark's rows: B=8 H=32 (8 k/v heads) Nk=32k and B=1 Nk=128k, d=128, fp16."""
    p = planner.plan(1, 32768, 128, dtype="float16", batch=8, heads=32, group=4, **H100)
    assert p.kernel == "flash_decode<fa_half, 128, 2, 64, 4, 0>" and p.grid == (2, 8, 8)
    slots = 132 * (227 * KB // p.smem_bytes)
    assert slots == 132 and 0.85 * slots <= math.prod(p.grid) <= slots   # one full wave: 128 of 132 blocks
    p = planner.plan(1, 131072, 128, dtype="float16", batch=1, heads=32, group=4, **H100)
    assert 0.85 * slots <= math.prod(p.grid) <= slots and p.splits >= 16
    # pages as long as the tile or longer: the same plan; shorter: 4 warps look their rows' pages up
    for page in (64, 256):
        assert planner.plan(1, 32768, 128, dtype="float16", batch=8, heads=32, group=4, page=page, **H100) == \
            planner.plan(1, 32768, 128, dtype="float16", batch=8, heads=32, group=4, **H100)
    for page in (1, 16, 32):
        p = planner.plan(1, 32768, 128, dtype="float16", batch=8, heads=32, group=4, page=page, **H100)
        assert p.kernel == "flash_decode<fa_half, 128, 4, 64, 3, 0>"
    # d = 64 streams 128-key tiles, but from pages shorter than that 64-key ones
    assert planner.plan(1, 32768, 64, dtype="float16", batch=8, heads=32, group=4, **H100).kernel == \
        "flash_decode<fa_half, 64, 4, 128, 4, 0>"
    for page in (1, 16, 64):
        p = planner.plan(1, 32768, 64, dtype="float16", batch=8, heads=32, group=4, page=page, **H100)
        assert p.kernel == "flash_decode<fa_half, 64, 4, 64, 4, 0>"
    assert planner.plan(1, 32768, 64, dtype="float16", batch=8, heads=32, group=4, page=256, **H100).Bc == 128
    with pytest.raises(ValueError, match="page"):
        planner.plan(1, 32768, 128, dtype="float16", page=-16, **H100)


@pytest.mark.parametrize("pairs, slots, tiles", [(1, 264, 2048), (8, 264, 2048), (64, 264, 512), (200, 264, 512),
                                                 (300, 264, 512), (3, 108, 10), (5, 132, 3), (1, 1, 1),
                                                 (2, 264, 100000), (7, 500, 4)])
def test_split_count(pairs, slots, tiles):
    splits = planner.decode_splits(pairs, slots, tiles)
    most = max(1, min(planner.DECODE_MAX_SPLITS, slots, tiles // planner.DECODE_MIN_TILES_PER_SPLIT))
    # the counts worth trying: those that change the tiles per split
    counts = [s for s in range(1, most + 1) if s == 1 or -(-tiles // s) != -(-tiles // (s - 1))]
    assert 1 <= splits <= most
    if pairs >= 0.8 * slots:
        assert splits == 1
    waves = pairs * splits / slots
    if splits > 1:   # a last wave at least 85% as full as that of any fewer splits
        assert waves / math.ceil(waves) >= 0.85 * max(
            pairs * s / slots / math.ceil(pairs * s / slots) for s in counts if s <= splits)
    if pairs * splits <= slots:   # one wave: no count worth trying fits more in it
        assert not [s for s in counts if s > splits and pairs * s <= slots]


def test_variants_include_decoding_on_sm80_only():
    for arch, limit in DEVICES:
        names = planner.cuda_variants(limit, arch)
        decode = [n for n in names if n.startswith("flash_decode<")]
        combine = [n for n in names if n.startswith("flash_decode_combine<")]
        if arch < 80:
            assert not decode and not combine
        else:
            bounds = {n.split(", ")[1] for n in decode}
            cases = {(n.split(", ")[0], n.split(", ")[1], n.split(", ")[-1]) for n in decode}   # (type, D, mask)
            assert len(bounds) == 8 and len(cases) == 8 * 2 * 3   # head-dim bounds x fp16/bf16 x masks
            expected = {planner.plan(1, 4096, D, dtype=dtype, window=mask >= 1, score_mod=mask == 2, smem_limit=limit,
                                     arch=arch, sm_count=1, decode=True, page=page).kernel
                        for D in range(32, 257, 32) for dtype in planner.DECODE_DTYPES for mask in planner.MASKS
                        for page in planner.DECODE_PAGES}
            assert set(decode) == expected   # paged caches' tiles too
            assert combine == ["flash_decode_combine<fa_bfloat16>", "flash_decode_combine<fa_half>"]


@pytest.mark.parametrize("Nq, Nk, BC, window", [(1, 1, 64, None), (1, 1000, 64, None), (4, 4097, 16, (-1, 0)),
                                                (16, 33000, 64, (-1, 0)), (3, 5000, 32, (700, 0)),
                                                (2, 300, 64, (10, 3)), (5, 300, 64, (0, 0))])
def test_splits_cover_the_seen_tiles_once(Nq, Nk, BC, window):
    """kernel_model.split_tiles (what flash_decode computes): the splits' tiles are disjoint,
    each split's in order, together exactly the tiles some row sees, and their counts differ by
    at most one, the larger counts first."""
    left, right = _cuda_backend.window_args(window or (-1, -1), Nq, Nk)
    mask = window is not None
    seen = set()
    for i in range(Nq):
        lo, hi = (max(0, i + Nk - Nq - left), min(Nk - 1, i + Nk - Nq + right)) if mask else (0, Nk - 1)
        seen |= set(range(lo // BC, hi // BC + 1)) if lo <= hi else set()
    for splits in (1, 2, 3, 7, 64, 200):
        runs = [kernel_model.split_tiles(Nq, Nk, BC, splits, s, mask, left, right) for s in range(splits)]
        tiles = [j for run in runs for j in run]
        assert sorted(tiles) == sorted(seen) and len(set(tiles)) == len(tiles)
        assert all(run == sorted(run) for run in runs)
        sizes = [len(run) for run in runs]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


# --- the launch plumbing, on the NumPy model of the kernels ------------------------------------

def _problem(q, k, v, causal=False, **features):
    """The validated problem the CUDA backend takes (NumPy inputs validate as the C backend's:
    the kernel model runs them), with the features' fields set as given."""
    on_host = isinstance(q, np.ndarray)
    problem = dataclasses.replace(validate(q, k, v, causal=causal, softmax_scale=None, return_lse=True,
                                           backend="c" if on_host else "cuda"), backend="cuda")
    return dataclasses.replace(problem, **features)


def _gqa(rng, B, H, Hkv, Nq, Nk, d, dtype=np.float32, layout="bhnd"):
    q = rng.standard_normal((B, H, Nq, d)).astype(dtype)
    k, v = (rng.standard_normal((B, Hkv, Nk, d)).astype(dtype) for _ in range(2))
    if layout == "bnhd":   # the same values in (B, N, H, d) memory
        q, k, v = (np.ascontiguousarray(x.swapaxes(1, 2)).swapaxes(1, 2) for x in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("DECODE_FUSED_MAX_ROWS, merge", [(planner.DECODE_FUSED_MAX_ROWS, None), (0, "launch")])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, d, causal, sm_count, expected", [
    (2, 8, 2, 1, 1000, 40, False, 132, "fused"), (1, 8, 1, 2, 4097, 64, True, 132, "launch"),
    (3, 4, 4, 4, 700, 16, True, 1, "one split"), (2, 6, 3, 8, 300, 24, True, 1000, "one split"),
    (1, 2, 2, 16, 2000, 8, True, 7, "launch"), (1, 4, 2, 2, 3000, 32, False, 50, "fused")])
def test_decode_launches_on_the_model(rng, monkeypatch, DECODE_FUSED_MAX_ROWS, merge, layout, B, H, Hkv, Nq, Nk,
                                      d, causal, sm_count, expected):
    """The launches read and write what the kernels would: q rows of a group packed per k/v
    head, the workspace of plan.workspace_bytes (none for one split), O and L as the one-pass
    kernel leaves them, the merge by the pairs' last splits (a zeroed count array passed) or a
    second launch, as the plan says (and with fused merges turned off); k and v are the caller's
    arrays (no repeat, no copy)."""
    monkeypatch.setattr(planner, "DECODE_FUSED_MAX_ROWS", DECODE_FUSED_MAX_ROWS)
    expected = "one split" if expected == "one split" else merge or expected
    q, k, v = _gqa(rng, B, H, Hkv, Nq, Nk, d, layout=layout)
    problem = _problem(q, k, v, causal)
    plan = planner.plan(Nq, Nk, d, dtype="float16", causal=causal, batch=B, heads=H, group=H // Hkv,
                        smem_limit=99 * KB, arch=80, sm_count=sm_count)
    assert plan.splits >= 1
    launches = []
    kernel_model.use(monkeypatch, launches)
    O, L = _cuda_backend.run(problem, plan, 0)
    O_ref, L_ref = reference.attention(q, k, v, causal=causal)
    np.testing.assert_allclose(O, O_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=1e-5)
    main = launches[0]
    assert main["kernel"] == plan.kernel and main["grid"] == plan.grid and main["group"] == H // Hkv
    assert (plan.splits == 1) == (expected == "one split") and (plan.combine != "") == (expected == "launch")
    assert isinstance(main["count"], np.ndarray) == (expected == "fused")
    if expected == "launch":
        combine = launches[1]
        assert combine["kernel"] == "combine" and len(launches) == 2
        assert (int(combine["splits"]), int(combine["pitch"])) == (plan.splits, plan.head_dim_bound)
    else:
        assert len(launches) == 1
    work = (main["Op"].nbytes + main["Lp"].nbytes) if plan.splits > 1 else 0
    assert work == plan.workspace_bytes
    assert all(np.shares_memory(main[name], x) for name, x in zip("kv", (k, v)))


@pytest.mark.parametrize("rows, splits, tiles, D, fused", [
    (4, 16, (2, 64, 4), 128, True),     # B1 32/8 heads: 4 rows, 16 splits, 33 of 128 KB
    (1, 128, (2, 64, 4), 128, True), (4, 128, (2, 64, 4), 128, False),   # 66 / 264 KB of 128
    (8, 2, (2, 64, 4), 128, False), (16, 1, (2, 64, 4), 128, True),      # more rows; one split
    (4, 7, (1, 16, 2), 64, True), (4, 8, (1, 16, 2), 64, False)])        # 8 KB: 4 x 7 x 65 floats fit
def test_fused_merge_choice(rows, splits, tiles, D, fused):
    """flash_decode merges a pair's splits itself for one split, or for a few rows whose partials
    fit in the K/V stages at once (merge_pair copies them all there)."""
    assert planner.decode_fused_merge(rows, splits, tiles, D) == fused
    p = planner.plan(1, 131072, 128, dtype="float16", batch=1, heads=32, group=4, smem_limit=227 * KB,
                     arch=90, sm_count=132)
    assert p.splits > 1 and p.combine == "" and p.workspace_bytes > 0


@pytest.mark.parametrize("Nq, Nk, group", [(3, 900, 2), (16, 7, 1), (8, 1, 2)])
def test_decode_with_more_splits_than_tiles_and_a_window(rng, monkeypatch, Nq, Nk, group):
    """Splits past the seen tiles write L_s = -inf, O_s = 0 and vanish in the merge; a window's
    splits cover only the tiles some row sees; causal rows that see no key (Nq > Nk) give O = 0,
    L = -inf. Against the model of the one-pass kernel, which reads the same window arguments."""
    q, k, v = _gqa(rng, 2, 2 * group, 2, Nq, Nk, 32)
    args = dict(causal=True, batch=2, heads=2 * group, group=group, window=True, smem_limit=99 * KB, arch=80,
                sm_count=132)
    plan = _with_splits(planner.plan(Nq, Nk, 32, dtype="float16", decode=True, **args), 40, 2, 2 * group, Nq, group)
    one = planner.plan(Nq, Nk, 32, decode=False, **args)
    launches = []
    kernel_model.use(monkeypatch, launches)
    for window in ((-1, 0), (100, 0), (0, 0), (5, 2), (300, -1)):
        O, L = _cuda_backend.run(_problem(q, k, v, True, window=window), plan, 0)
        O_ref, L_ref = _cuda_backend.run(_problem(q, k, v, True, window=window), one, 0)
        np.testing.assert_allclose(O, O_ref, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_ref))
        np.testing.assert_allclose(L[np.isfinite(L)], L_ref[np.isfinite(L_ref)], rtol=0, atol=1e-5)
        if window == (-1, 0):   # plain causal
            assert np.isneginf(L).any() == (Nq > Nk)


def test_combine_is_merge_attention(rng):
    """The combine's math (one pass over the splits: max, weights, weighted sum) is merge.py's
    pairwise merge applied split by split, to fp32 rounding."""
    q, k, v = (rng.standard_normal((3, 2, n, 16)).astype(np.float32) for n in (2, 500, 500))
    parts = [reference.attention(q, k[..., a:b, :], v[..., a:b, :]) for a, b in ((0, 64), (64, 300), (300, 500))]
    O, L = parts[0][0].astype(np.float32), parts[0][1].astype(np.float32)
    for O_s, L_s in parts[1:]:
        O, L = merge_attention(O, L, O_s.astype(np.float32), L_s.astype(np.float32))
    Ls = np.stack([p[1] for p in parts])
    m = Ls.max(0)
    w = np.exp(Ls - m) / np.exp(Ls - m).sum(0)
    O_one = sum(w_s[..., None] * p[0] for w_s, p in zip(w, parts))
    np.testing.assert_allclose(O, O_one, atol=1e-6)
    np.testing.assert_allclose(L, m + np.log(np.exp(Ls - m).sum(0)), atol=1e-5)
    O_ref, L_ref = reference.attention(q, k, v)
    np.testing.assert_allclose(O_one, O_ref, atol=1e-12)
    np.testing.assert_allclose(L, L_ref, atol=1e-5)


def test_decode_tolerance_adds_fp32_rounding_only(rng):
    """The decoding bounds are the one-pass bounds' order (at most ~3x), not a loose sum per merge."""
    from tolerances import bounds
    q, k, v = _gqa(rng, 1, 4, 1, 1, 33000, 128, np.float16)
    one = bounds(q, k, v, compute="tensor_core", p="float16", out="float16")
    split = bounds(q, k, v, compute="tensor_core", p="float16", out="float16", splits=64)
    assert one[0] < split[0] < 3 * one[0] and one[1] < split[1] < 3 * one[1]


# --- on a GPU -----------------------------------------------------------------------------------

def _run_plan(cp, q, k, v, plan, causal):
    problem = validate(q, k, v, causal=causal, softmax_scale=None, return_lse=True, backend="cuda")
    O, L = _cuda_backend.run(problem, plan, q.device.id)
    return cp.asnumpy(O), cp.asnumpy(L)


def _forced(cp, q, k, v, causal, **kw):
    problem = validate(q, k, v, causal=causal, softmax_scale=None, return_lse=True, backend="cuda")
    return planner.plan(problem.Nq, problem.Nk, problem.d, dtype=problem.dtype, causal=causal,
                        batch=problem.batch, heads=problem.heads, group=problem.group, **kw)


def _with_splits(plan, splits, batch, heads, Nq, group):
    """A decoding plan forced to `splits` splits, with the workspace and the merge (in the kernel
    or by the combine launch) the planner gives that count."""
    tiles = tuple(int(x) for x in plan.kernel.split(",")[2:5])   # flash_decode<T, D, NW, BC, STAGES, MASK>
    fused = planner.decode_fused_merge(group * Nq, splits, tiles, plan.head_dim_bound)
    return dataclasses.replace(plan, splits=splits, grid=(splits,) + plan.grid[1:],
                               combine="" if fused else planner.combine_name(plan.dtype),
                               workspace_bytes=planner.decode_workspace_bytes(batch, heads, Nq, splits,
                                                                               plan.head_dim_bound))


def _check_sharp(cp, qh, kh, vh, O, L, causal, q, k, v):
    """Decoding's error within 3x the one-pass tensor-core kernel's, plus half an ulp of the output."""
    one = _forced(cp, q, k, v, causal, decode=False)
    assert one.kernel.startswith(("flash_fwd_mma", "flash_fwd_wgmma"))
    O1, L1 = _run_plan(cp, q, k, v, one, causal)
    O_ref, L_ref = reference.attention(qh, kh, vh, causal=causal)
    seen = np.isfinite(L_ref)   # rows that see no key are checked exactly by assert_attention_close
    err = lambda X, Y: float(np.abs(X.astype(np.float64)[seen] - Y[seen]).max(initial=0.0))  # noqa: E731
    u_out = UNIT_ROUNDOFF[np.dtype(qh.dtype).name]
    floor_O = u_out * float(np.abs(O_ref).max())
    floor_L = 2.0**-22 * (float(np.abs(L_ref[seen]).max(initial=0.0)) + 1)
    e_dec, e_one = (err(O, O_ref), err(L, L_ref)), (err(O1, O_ref), err(L1, L_ref))
    assert e_dec[0] <= 3 * e_one[0] + floor_O, f"O: decoding {e_dec[0]:.3e}, one pass {e_one[0]:.3e}"
    assert e_dec[1] <= 3 * e_one[1] + floor_L, f"L: decoding {e_dec[1]:.3e}, one pass {e_one[1]:.3e}"


# (B, H, Hkv, Nq, d): groups 1, 4, 8 and MQA; group * Nq from 1 to 16
GPU_SHAPES = [(2, 4, 4, 1, 128), (2, 8, 2, 4, 64), (1, 8, 1, 1, 128), (2, 16, 2, 2, 80), (1, 4, 4, 16, 40),
              (1, 8, 1, 2, 256), (3, 4, 1, 3, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("Nk", [1, 7, 1000, 4097, 33000])
@pytest.mark.parametrize("B, H, Hkv, Nq, d", GPU_SHAPES)
def test_decode_against_the_reference(cp, rng, dtype, Nk, B, H, Hkv, Nq, d):
    causal = Nq > 1
    qh, kh, vh = _gqa(rng, B, H, Hkv, Nq, Nk, d, np_dtype(dtype))
    q, k, v = (cp.asarray(x) for x in (qh, kh, vh))
    plan = plan_for(q, k, v, causal=causal)
    if Nk >= planner.DECODE_MIN_KEYS:   # the planner chose decoding on its own
        assert plan.kernel.startswith("flash_decode<") and plan.splits >= 1, str(plan)
        O, L = flash_attention(q, k, v, causal=causal, return_lse=True)
        O, L = cp.asnumpy(O), cp.asnumpy(L)
    else:                               # too few keys for it to pay: forced here
        assert not plan.splits
        plan = _forced(cp, q, k, v, causal, decode=True)
        O, L = _run_plan(cp, q, k, v, plan, causal)
    assert O.dtype == qh.dtype and L.dtype == np.float32
    assert_attention_close(O, L, qh, kh, vh, causal=causal, **kernel_rounding(plan))
    _check_sharp(cp, qh, kh, vh, O, L, causal, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("splits", [1, 2, 5, 33, 128])
@pytest.mark.parametrize("merge", ["in the kernel", "launch"])
def test_one_split_and_many(cp, rng, dtype, splits, merge):
    """The same problem cut into 1 .. 128 splits (past the tiles: empty splits) agrees with the
    reference each time, and one split's result is the one-pass result's accuracy; merged by
    the k/v heads' last splits (1 row a k/v head, 66 KB of partials at 128 splits) or by the
    combine launch (8 rows), as the planner's rule gives for those rows."""
    H, Hkv, Nq = (2, 2, 1) if merge == "in the kernel" else (8, 2, 2)
    qh, kh, vh = _gqa(rng, 2, H, Hkv, Nq, 4097, 128, np_dtype(dtype))
    q, k, v = (cp.asarray(x) for x in (qh, kh, vh))
    plan = _with_splits(_forced(cp, q, k, v, True, decode=True), splits, 2, H, Nq, H // Hkv)
    assert (plan.combine == "") == (merge == "in the kernel" or splits == 1), str(plan)
    O, L = _run_plan(cp, q, k, v, plan, True)
    assert_attention_close(O, L, qh, kh, vh, causal=True, **kernel_rounding(plan))
    _check_sharp(cp, qh, kh, vh, O, L, True, q, k, v)
    O2, L2 = _run_plan(cp, q, k, v, plan, True)
    assert (O == O2).all() and (L == L2).all()   # merged in split order whichever block merges: repeatable


# Every decoding tile candidate at a head dim of its row: d = 64 for the first, 96 and 128 for the second
TILE_CASES = [(d, tiles) for D, candidates in planner.DECODE_TILES for tiles in candidates
              for d in ((64,) if D == 64 else (96, 128))]


@pytest.mark.gpu
@pytest.mark.parametrize("H, Hkv, Nq", [(8, 2, 2), (2, 2, 1)])
@pytest.mark.parametrize("d, tiles", TILE_CASES)
def test_every_decode_tile_runs(cp, rng, d, tiles, H, Hkv, Nq):
    """Each (warps, key tile, stages) candidate, forced (planner.DECODE_TILES narrowed to it) where
    it fits this GPU: keys ragged past the last tile, causal rows, against the reference and the
    one-pass kernel, with 8 query rows a k/v head and with 1 (whose splits the kernel merges
    where they fit in its stages). The planner's first choices run in every other test; this
    reaches the ones smaller GPUs get."""
    from flashattn_cupy import _device
    if planner.decode_smem_bytes(*tiles, planner.head_dim_bound(d)) > _device.smem_limit():
        pytest.skip(f"{tiles} at d = {d} needs more shared memory than this GPU has")
    qh, kh, vh = _gqa(rng, 2, H, Hkv, Nq, 3001, d, np.float16)
    q, k, v = (cp.asarray(x) for x in (qh, kh, vh))
    with planner._default("DECODE_TILES", ((planner.MAX_HEAD_DIM, (tiles,)),)):
        plan = _forced(cp, q, k, v, True, decode=True)
    assert ", {}, {}, {}, ".format(*tiles) in plan.kernel, plan.kernel
    O, L = _run_plan(cp, q, k, v, plan, True)
    assert_attention_close(O, L, qh, kh, vh, causal=True, **kernel_rounding(plan))
    _check_sharp(cp, qh, kh, vh, O, L, True, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["bnhd", "sliced", "unaligned"])
def test_non_contiguous_layouts(cp, rng, dtype, layout):
    """(B, N, H, d) memory seen as (B, H, N, d), a slice of a longer KV cache, and data one
    element past an aligned address (element-wise loads): read in place, right answers."""
    B, H, Hkv, Nq, Nk, d = 2, 8, 2, 3, 3000, 64
    qh, kh, vh = _gqa(rng, B, H, Hkv, Nq, Nk, d, np_dtype(dtype))
    if layout == "bnhd":
        q, k, v = (cp.ascontiguousarray(cp.asarray(x).swapaxes(1, 2)).swapaxes(1, 2) for x in (qh, kh, vh))
    elif layout == "sliced":   # a cache of 4096 slots, 3000 filled; q heads interleaved with others
        cache = [cp.zeros((B, Hkv, 4096, d), dtype=qh.dtype) for _ in range(2)]
        for c, x in zip(cache, (kh, vh)):
            c[:, :, :Nk] = cp.asarray(x)
        big_q = cp.zeros((B, 2 * H, Nq, d), dtype=qh.dtype)
        big_q[:, ::2] = cp.asarray(qh)
        q, k, v = big_q[:, ::2], cache[0][:, :, :Nk], cache[1][:, :, :Nk]
    else:
        def shifted(x):
            buf = cp.zeros(x.size + 1, dtype=x.dtype)
            buf[1:] = cp.asarray(x).ravel()
            return buf[1:].reshape(x.shape)
        q, k, v = (shifted(x) for x in (qh, kh, vh))
    plan = plan_for(q, k, v, causal=True)
    assert plan.splits >= 1, str(plan)
    O, L = flash_attention(q, k, v, causal=True, return_lse=True)
    O, L = cp.asnumpy(O), cp.asnumpy(L)
    assert_attention_close(O, L, qh, kh, vh, causal=True, **kernel_rounding(plan))
    _check_sharp(cp, qh, kh, vh, O, L, True, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_scale_and_large_scores(cp, rng, dtype):
    for scale in (-0.3, 0.0, 2.5):
        qh, kh, vh = _gqa(rng, 1, 4, 1, 2, 5000, 64, np_dtype(dtype))
        q, k, v = (cp.asarray(x) for x in (qh, kh, vh))
        O, L = flash_attention(q, k, v, softmax_scale=scale, return_lse=True)
        plan = plan_for(q, k, v, softmax_scale=scale)
        assert plan.splits >= 1
        assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), qh, kh, vh, softmax_scale=scale, **kernel_rounding(plan))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_window_softcap_alibi(cp, rng, dtype, monkeypatch):
    """MASK 1 (a sliding window, whose split covers only the tiles some row sees) and MASK 2
    (softcap, ALiBi: one slope per q head, so per packed row) against kernel_model's float64,
    through the backend with a problem carrying the features (the API takes them elsewhere)."""
    B, H, Hkv, Nq, Nk, d = 2, 8, 2, 3, 5000, 64
    qh, kh, vh = _gqa(rng, B, H, Hkv, Nq, Nk, d, np_dtype(dtype))
    q, k, v = (cp.asarray(x) for x in (qh, kh, vh))
    slopes = rng.uniform(0.001, 0.05, B * H).astype(np.float32)
    for window, softcap, alibi in [((700, 0), 0.0, None), ((-1, 0), 8.0, None), ((300, 2), 5.0, slopes),
                                   ((0, 0), 0.0, None), ((64, -1), 0.0, slopes)]:
        features = dict(window=window, softcap=softcap, alibi=None if alibi is None else cp.asarray(alibi))
        problem = _problem(q, k, v, True, **features)
        plan = planner.plan(Nq, Nk, d, dtype=dtype, causal=True, batch=B, heads=H, group=H // Hkv,
                            **_cuda_backend.mask_options(problem))
        assert plan.splits >= 1 and plan.mask == (2 if softcap or alibi is not None else 1)
        O, L = (cp.asnumpy(x) for x in _cuda_backend.run(problem, plan, q.device.id))
        # the float64 model of the one-pass kernel computes the same features exactly
        with monkeypatch.context() as m:
            launches = []
            kernel_model.use(m, launches)
            model_problem = _problem(*(x.astype(np.float32) for x in (qh, kh, vh)), True,
                                     **dict(features, alibi=alibi))
            one = planner.plan(Nq, Nk, d, causal=True, batch=B, heads=H, group=H // Hkv, smem_limit=99 * KB,
                               arch=80, sm_count=1, decode=False, **_cuda_backend.mask_options(model_problem))
            O_ref, L_ref = _cuda_backend.run(model_problem, one, 0)
        empty = np.isneginf(L_ref)
        np.testing.assert_array_equal(np.isneginf(L), empty)
        assert (O[empty] == 0).all()
        tol = 4 * UNIT_ROUNDOFF[dtype] * np.abs(vh.astype(np.float64)).max() + 2e-3
        assert np.abs(O.astype(np.float64) - O_ref).max() <= tol, (window, softcap)
        assert np.abs(L[~empty] - L_ref[~empty]).max() <= 2e-3, (window, softcap)


def test_split_counts_per_thread_device_and_stream():
    """The fused merge's counts: one zeroed array per (thread, device, stream), reused while large
    enough, grown when not; two threads on the same stream handle (per-thread default streams
    share one) get their own."""
    import threading
    from types import SimpleNamespace
    current = {"device": 0, "stream": 0}
    fake = SimpleNamespace(int32=np.int32, zeros=np.zeros, cuda=SimpleNamespace(
        get_current_stream=lambda: SimpleNamespace(ptr=current["stream"])))
    counts = lambda n: _cuda_backend.split_counts(fake, current["device"], n)  # noqa: E731
    a = counts(10)
    assert a.dtype == np.int32 and a.size >= 10 and not a.any()
    assert counts(20) is a                     # same thread, device, stream
    assert counts(a.size + 1).size > a.size     # grown
    a = counts(10)
    current["stream"] = 7
    b = counts(10)
    current["device"] = 1
    c = counts(10)
    assert b is not a and c is not b and counts(10) is c
    other = []
    thread = threading.Thread(target=lambda: other.append(counts(10)))
    thread.start()
    thread.join()
    assert other[0] is not c
