"""The C twin under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer.

csrc/flash_fwd.c and the driver tests/c/flash_driver.c are built with gcc, the package's own
optimization flags and -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all,
so any out-of-bounds access, leak or undefined operation aborts the driver and fails the test
with the sanitizer's report. Each input and output is its own exact-size malloc in the driver.
The cases: awkward shapes, the tiles the planner picks and other ones (1 x 1 up to 128 x 64,
non-square, not multiples of the vector width), causal or not, sliding windows (some emptying
rows, or tiles), softcap and ALiBi, float and double, NaN and inf
inputs (the exp's clamps), and flash_exp_f32 on special values. The outputs are checked against
the float64 reference, so a sanitized build that computes wrongly fails too.
(The GPU kernels' counterpart is tests/sanitize_gpu.py, under compute-sanitizer.)"""
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cases import inputs
from flashattn_cupy import planner
from nonfinite import assert_nonfinite_like_reference
from tolerances import assert_attention_close

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-std=c11", "-O3", "-ffp-contract=fast"]    # as flashattn_cupy/_build_cffi.py
SANITIZE = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer", "-g"]
ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}

SHAPES = [   # (BH, Nq, Nk, d)
    (1, 1, 1, 1), (2, 1, 7, 3), (1, 7, 1, 5), (3, 17, 31, 40), (2, 33, 65, 59), (1, 113, 203, 80),
    (2, 203, 113, 111), (1, 64, 64, 64), (1, 65, 63, 128), (1, 31, 33, 129), (1, 9, 300, 256),
    (1, 250, 10, 255),
]
GROUPED = [(4, 2, 33, 65, 40), (6, 6, 17, 31, 59), (3, 3, 1, 7, 3)]   # (BH, group, Nq, Nk, d): GQA, MQA
EXTRA_TILES = [(1, 1), (3, 5), (8, 8), (16, 16), (17, 33), (64, 64), (128, 64), (128, 32)]
# the C twin's flash_mods beyond causal, one per case in rotation: (window, softcap, ALiBi)
MODS = [((5, 3), 0.0, False), ((0, 0), 2.5, False), ((40, -1), 0.0, True), ((-1, -1), 7.0, True),
        ((-1, 0), 1.0, True), ((2, 60), 0.0, False), ((300, 0), 0.0, False)]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the AddressSanitizer/UBSan build needs it")
    exe = tmp_path_factory.mktemp("sanitized") / "flash_driver"
    build = subprocess.run([gcc, *FLAGS, *SANITIZE, "-I", str(ROOT / "csrc"), str(ROOT / "tests/c/flash_driver.c"),
                            str(ROOT / "csrc/flash_fwd.c"), "-lm", "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


def _record(op, q, k, v, Br, Bc, mods, scale):
    """The driver's record; mods: assert_attention_close's window, softcap and alibi_slopes."""
    BH, Nq, d = q.shape
    (left, right), alibi = mods.get("window") or (-1, -1), mods.get("alibi_slopes")
    head = struct.pack("<11q2d", op, BH, BH // k.shape[0], Nq, k.shape[1], d, Br, Bc, left, right,
                       alibi is not None, scale, mods.get("softcap", 0.0))
    slopes = () if alibi is None else (alibi,)
    return head + b"".join(np.ascontiguousarray(x).tobytes() for x in (q, k, v, *slopes))


def _mods(rng, n, BH, causal=None):
    """Causal (window (-1, 0)) or not, or, with causal None, MODS[n % len(MODS)]."""
    if causal is not None:
        return {"window": (-1, 0)} if causal else {}
    window, softcap, alibi = MODS[n % len(MODS)]
    mods = {"window": window, "softcap": softcap}
    if alibi:
        mods["alibi_slopes"] = rng.uniform(0, 0.5, BH).astype(np.float32)
    return mods


def _run(driver, records):
    done = subprocess.run([str(driver)], input=b"".join(records), capture_output=True,
                          env={**os.environ, **ENV}, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-6000:]
    return done.stdout


def _attention_cases():
    """(q, k, v, Br, Bc, mods, scale) over SHAPES x tiles x (plain, causal, MODS) x dtype."""
    rng = np.random.default_rng(7)
    n = 0
    for BH, Nq, Nk, d in SHAPES:
        for dtype in (np.float32, np.float64):
            q, k, v = inputs(rng, (BH,), Nq, Nk, d, dtype=dtype)
            chosen = planner.plan(Nq, Nk, d, dtype=np.dtype(dtype).name, backend="c")
            for Br, Bc in {(chosen.Br, chosen.Bc), EXTRA_TILES[n % 8], EXTRA_TILES[(n + 3) % 8]}:
                for causal in (False, True, None):
                    n += 1
                    yield q, k, v, Br, Bc, _mods(rng, n, BH, causal), 1 / np.sqrt(d)
    for BH, group, Nq, Nk, d in GROUPED:   # k and v hold BH / group heads, each read by its group
        for dtype in (np.float32, np.float64):
            q, k, v = inputs(rng, (BH,), Nq, Nk, d, dtype=dtype)
            for Br, Bc in ((16, 16), (3, 5)):
                n += 1
                yield q, k[::group], v[::group], Br, Bc, _mods(rng, n, BH), 1 / np.sqrt(d)


def _split(out, q, offset):
    """(O, L, new offset) from the driver's output for input q."""
    n = q.size * q.itemsize
    O = np.frombuffer(out, q.dtype, q.size, offset).reshape(q.shape)
    L = np.frombuffer(out, np.float32, q.shape[0] * q.shape[1], offset + n).reshape(q.shape[:2])
    return O, L, offset + n + L.nbytes


def test_attention_under_asan_and_ubsan(driver):
    cases = list(_attention_cases())
    out = _run(driver, [_record(0 if case[0].dtype == np.float32 else 1, *case) for case in cases])
    offset = 0
    for q, k, v, Br, Bc, mods, scale in cases:
        O, L, offset = _split(out, q, offset)
        compute = "float64" if q.dtype == np.float64 else "float32"
        assert_attention_close(O, L, q, k, v, softmax_scale=scale, compute=compute, **mods)
    assert offset == len(out)


def test_nonfinite_inputs_under_asan_and_ubsan(driver):
    """NaN and inf reach the exp with x > 0 (a NaN hides the row's true max), which must stay
    defined; the outputs follow the reference's semantics."""
    rng = np.random.default_rng(11)
    cases = []
    for value in (np.nan, np.inf, -np.inf):
        for name in "qkv":
            q, k, v = inputs(rng, (2,), 45, 70, 24)
            {"q": q, "k": k, "v": v}[name][0, ::7, ::5] = value
            for Br, Bc in ((32, 32), (3, 17)):
                for causal in (False, True):
                    cases.append((q, k, v, Br, Bc, causal, 0.3))
    out = _run(driver, [_record(0, q, k, v, Br, Bc, {"window": (-1, 0)} if causal else {}, scale)
                        for q, k, v, Br, Bc, causal, scale in cases])
    offset = 0
    for q, k, v, Br, Bc, causal, scale in cases:
        O, L, offset = _split(out, q, offset)
        assert_nonfinite_like_reference(O, L, q, k, v, causal=causal, softmax_scale=scale)


def test_exp_under_ubsan(driver):
    x = np.array([-np.inf, -1e30, -100, -87.4, -1, 0, 1, 50, 88, 100, 1e30, np.inf, np.nan], np.float32)
    records = [struct.pack("<11q2d", 2, x.size, 1, 0, 0, 0, 0, 0, -1, -1, 0, base, 0.0) + x.tobytes()
               for base in (0.0, 3.0, -np.inf)]
    y = np.frombuffer(_run(driver, records), np.float32).reshape(3, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        for got, base in zip(y, (0.0, 3.0, -np.inf)):
            want = np.exp((x - np.float32(base)).astype(np.float64))
            finite = (want > 1e-37) & (want < 1e38)
            np.testing.assert_allclose(got[finite], want[finite], rtol=3e-7)
            assert (got[want <= 1e-37] == 0).all() and np.isposinf(got[want >= 1e38]).all()
            assert np.array_equal(np.isnan(got), np.isnan(want))


# tests/sanitize_gpu.py runs on a GPU machine; its grid and its reading of compute-sanitizer's
# output are checked here. (arch, opt-in shared memory per block) of the GPUs the planner serves:
DEVICES = [(75, 48 * 1024), (75, 64 * 1024), (80, 48 * 1024), (80, 99 * 1024), (80, 163 * 1024),
           (86, 99 * 1024), (89, 99 * 1024), (90, 227 * 1024)]


@pytest.mark.parametrize("arch, smem_limit", DEVICES)
def test_gpu_sanitizer_grid_reaches_every_variant(arch, smem_limit):
    import sanitize_gpu
    reached, variants = sanitize_gpu.kernels_reached(smem_limit, arch)
    assert variants and variants <= reached


def test_gpu_sanitizer_reads_the_summaries():
    from sanitize_gpu import summarize
    assert summarize("========= COMPUTE-SANITIZER\nworker: ...\n========= ERROR SUMMARY: 0 errors\n") == (0, 0)
    assert summarize("========= Invalid __global__ read of size 2 bytes\n========= ERROR SUMMARY: 3 errors") == (3, 0)
    assert summarize("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)") == (1, 1)
    assert summarize("========= Error: Target application terminated before first instrumented API call") is None


@pytest.mark.parametrize("n, shards", [(672, 12), (5, 3), (3, 5), (0, 4), (7, 1)])
def test_gpu_sanitizer_shards_cover_the_grid_once(n, shards):
    """--shards N: contiguous slices (each shard loads few variants), together every call once."""
    from sanitize_gpu import shard_of
    items = list(range(n))
    parts = [shard_of(items, i, shards) for i in range(shards)]
    assert sum(parts, []) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
