"""The planner: the one place that chooses tiles and launch shapes.

Kernels never guess. Given the problem's sizes, dtype and causal flag, and for the GPU
the device's shared-memory limit, `plan()` returns a frozen, printable `Plan` that says
exactly what will run: tile sizes Br x Bc, the head-dim bound the kernel is compiled for,
threads per block (for C: Python threads), grid, and shared-memory bytes (the CUDA
kernel's exact layout; for C, the tiles' working set).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

# dtype name -> the kernels' element type (csrc/fa_dtypes.cuh)
CUDA_TYPES = {"float32": "float", "float16": "fa_half", "bfloat16": "fa_bfloat16"}
C_TYPES = {"float32": "f32", "float64": "f64"}

MAX_HEAD_DIM = 256
HEAD_DIM_STEP = 32         # kernels are compiled for d rounded up to a multiple of this ...
MMA_HEAD_DIM_STEP = 16     # ... or of this for the mma kernel, whose MMAs are 16 wide in d (fp32 d = 40
                           # runs at D = 48, not 64; d = 80 at 80, not 96)
TILE_CANDIDATES = (64, 32, 16, 8)   # Br = Bc, largest first
# The register-tiled CUDA-core kernel (csrc/flash_fwd_fma.cu): (largest D, (Br, Bc, RM) candidates,
# best first); (Br / RM) x 16 threads, each RM rows of Sij and Oi. RM = 8: 8 x 4 scores and 8 x
# D/16 outputs a thread. Measured on an H200 (2026-12-05, fp32, N = 1k/4k/16k with B*H*N = 256k,
# causal or not, every tile in one run, BENCHMARKS.md "Session 22"): d <= 64 (128, 64, 8), 100 KB,
# two blocks an SM at 128 registers, 30.5-36.1 TFLOP/s, 2-7% over (64, 64, 8) (68 KB, three
# blocks, the 99 KB devices' tile) and 1.8x the 4-row kernel it replaced; d <= 128 (128, 64, 8),
# 166 KB, one block of 8 warps, 32-39 TFLOP/s, 1.1-1.3x every other tile tried, 2.1-2.2x the old. (64, 32, 4), the first shape (4 x 2
# scores a thread, 43 / 77 KB), where those do not fit, and (32, 32, 4) past d = 128. It serves
# sm_80 and later (float32 with fp32="simt": it copies with cp.async); Turing keeps
# flash_fwd_simt.cu (the seed's configuration) until it has run on one.
FMA_TILES = ((64, ((128, 64, 8), (64, 64, 8), (64, 32, 4))), (128, ((128, 64, 8), (64, 32, 4))),
             (256, ((32, 32, 4),)))
FMA_MIN_ARCH = 80
# The C twin's tiles (Br, Bc) by head dim. Measured with one thread, float32, on the 2-core
# AVX-512 (Zen 4) machine, nine shapes from 32x32 to 256x64 at N = 1024, 2048, 4096, causal and
# not, all in one run: Br matters most, because each (i, j) step transposes Kj and copies Vj and
# a tall Qi spreads that over more rows; Bc = 64 keeps KjT and Vj (Bc*d floats each) within a
# 32 KB L1 at d = 128. 128x64 was the fastest or within 5% of it at every point for d = 64 and
# 128 (1.2-1.35x the 32x32 of the seed, which is a GPU configuration), where 256x64 won without
# the mask but lost with it. At d = 160 and 256, 128x32 was fastest (64x64 7-10% slower,
# 16x16 up to 35% slower). Qi and Oi (Br*d each) stream through L2 once per Kj tile.
C_TILE_FOR_HEAD_DIM = ((128, 128, 64), (256, 128, 32))   # (largest d, Br, Bc)
GRID_YZ_MAX = 65535                 # CUDA's limit on gridDim.y and gridDim.z

# The tensor-core kernel (csrc/flash_fwd_mma.cu): fp16 from sm_75 (m16n8k8), fp16, bf16 and
# fp32 (as TF32 or 3xTF32) from sm_80 (m16n8k16 / m16n8k8 tf32 + cp.async). Its ARCH template
# argument is the instruction set, so a Turing plan (arch=75) also runs, and is tested, on
# later GPUs.
MMA_DTYPES = {75: ("float16",), 80: ("float16", "bfloat16", "float32")}
FP32_MODES = ("auto", "3xtf32", "tf32", "simt")
# The kernels' MASK template argument (csrc/fa_mask.cuh): 0 nothing masked, 1 a window (causal
# is one), 2 a window and the score mods (softcap, ALiBi), each off when its value says so.
MASKS = (0, 1, 2)
# (largest D, (warps, m-tiles per warp, Bc) candidates, best first): Br = 16 * m-tiles * warps.
# Two m-tiles a warp halve the shared-memory reads per MMA; the first choices come from a sweep
# on an H100 (fp16, N = 1k and 4k): 128 x 128 at d = 64 and 128 x 64 at d = 128 (FA2's
# tiles), 2-11% ahead of the next; past d = 128 the Oi accumulators leave room for one m-tile.
MMA_TILES = ((64, ((4, 2, 128), (4, 2, 64), (4, 1, 64), (4, 1, 32), (2, 1, 32))),
             (128, ((4, 2, 64), (4, 2, 32), (4, 1, 32), (2, 1, 16))),
             (256, ((4, 1, 64), (4, 1, 32), (4, 1, 16), (2, 1, 16), (1, 1, 16))))
# fp32 rows are twice as wide in shared memory; from the same sweep (3xTF32 and TF32 alike):
# 128 x 64 at d = 64 and 128 x 32 at d = 128, 4-40% ahead of one m-tile a warp. Past d = 128,
# 8 warps of one m-tile (Br 128, ~200 KB at D = 256): 4 warps left one block of them an SM at 255
# registers a thread (H200, B4 H16 N4k, 3xTF32: d160 41 -> 44.5, d224 24 -> 41, d256 23 -> 40 TFLOP/s).
MMA_TILES_F32 = ((64, ((4, 2, 64), (4, 2, 32), (4, 1, 32), (2, 1, 16))),
                 (128, ((4, 2, 32), (4, 1, 32), (2, 1, 16), (1, 1, 16))),
                 (256, ((8, 1, 32), (4, 1, 32), (4, 1, 16), (2, 1, 16), (1, 1, 16))))

# Split-KV decoding (csrc/flash_decode.cu, flash-decoding): for few query rows per k/v head and
# many keys. One block per (batch, k/v head, split of the keys) holds all group * Nq query rows
# that read the k/v head as one 16-row MMA tile (so K and V are read once per k/v head), streams
# its split through a STAGES-deep cp.async pipeline, and writes a partial (O_s, L_s) in fp32;
# the pair's last split or a second kernel merges the splits (merge.py's math; one split writes
# O and L itself). fp16/bf16 on sm_80+ only: fp32 and Turing keep the other kernels. Chosen
# (plan's decode=None) when group * Nq <= DECODE_MAX_ROWS and Nk >= DECODE_MIN_KEYS (below that
# a call is launch-bound either way).
DECODE_MAX_ROWS = 16
DECODE_MIN_KEYS = 256
DECODE_MAX_SPLITS = 128            # the combine kernel's bound (flash_decode_combine MAX_SPLITS)
DECODE_MIN_TILES_PER_SPLIT = 4     # a split streams at least this many key tiles (if there are)
# Where a pair (batch, k/v head) has at most this many query rows, its splits' partials are merged
# by its last split to finish, in the decoding kernel (no second launch), if they fit in its K/V
# stages at once. H200, fp16 d128, 32/8 heads, µs with the combine launch / fused: B1 Nq1 Nk128k
# (4 rows, 16 splits) 133.1 / 130.3, B8 Nk32k (2 splits) 244.0 / 243.8; with 8 or 16 rows one
# block's merge costs more than the launch: B4 Nq2 Nk16k 74.3 / 75.6, B8 Nq4 Nk32k 247.1 / 252.4,
# B1 16/1 heads Nk64k (16 rows, 128 splits) 60.0 / 78.5 (BENCHMARKS.md, session 16).
DECODE_FUSED_MAX_ROWS = 4
DECODE_DTYPES = ("float16", "bfloat16")
# Whether plan(decode=None) picks decoding where use_decode() says it pays (on since its gpu
# tests passed on an H200, 2026-12-02). decode_default(False) turns it off for a block of calls:
# how `bench --decode` times the one-pass kernel on the same call.
DECODE_BY_DEFAULT = True


# Hopper's warpgroup MMA (csrc/flash_fwd_wgmma.cu): sm_90a instructions, which neither earlier nor
# later GPUs run, so only compute capability 9.0 gets it; fp16/bf16 at head-dim bounds 64 and 128
# (d in 33..64 and 97..128; other d keep the mma kernel). (D, (warpgroups, Bc) candidates, best
# first): Br = 64 * warpgroups, two K/V buffers, and two blocks an SM, which the kernel's launch
# bounds (128 registers a thread) and each candidate's shared memory (WGMMA_SM_SMEM) allow. From a
# sweep on an H200 (fp16, 2026-12-02, TFLOP/s at B16 H16 N1k / B4 H16 N4k / B1 H16 N16k, dense and
# causal): d = 64, (2, 128) 293 / 322 / 328 and 192 / 262 / 290 causal, against (2, 64) 263 / 286 /
# 297 and 176 / 238 / 267; d = 128, (2, 64) 331 / 354 / 366 and 234 / 302 / 337 causal, against
# (1, 64) 214 / 227 / 236. One block an SM lost at short N and at best tied at long N: three
# warpgroups (d = 128, (3, 64): 291 / 348 / 367 and 183 / 282 / 346, ahead only at N = 16k
# causal), three stages with P(j-1) V(j-1) overlapping tile j's softmax ((3, 64) 3 stages 278 /
# 305 / 336: but ptxas serialized that kernel's MMAs, C7514, its first tile in the loop's branch, so
# the overlap itself went unmeasured; branch wip/s21 peels it off), and (2, 128) at d = 64 with the
# causal mask's 134 registers (139 / 204 / 242 causal).
# (All before the grid-wide causal order, which added 4-13% to the chosen tiles' causal rows.)
# Each later candidate needs less shared memory.
WGMMA_ARCH = 90
WGMMA_DTYPES = ("float16", "bfloat16")
WGMMA_TILES = ((64, ((2, 128), (2, 64))),
               (128, ((2, 64), (1, 64))))
# a producer warpgroup and two consumers (the warp-specialized kernel below)
WGMMA_WS_THREADS = 384
# float32 as 3xTF32 on the warpgroup MMA with warp specialization (csrc/flash_fwd_wgmma_f32_ws.cu),
# where fp32 runs on the tensor cores ("auto", "3xtf32"; plain TF32 keeps the mma kernel, which ran
# it faster): a producer warpgroup that splits Qi, Kj and Vj (and transposes Vj) in registers, two
# consumers, Br = 128, one block an SM, WGMMA_WS_THREADS threads; (D, (Bc, Kj buffers, Vj buffers)):
# at d = 128 Qi's hi and lo take 128 KB, so Vj has one buffer. On by default with the fp16 wgmma
# kernel (WGMMA_BY_DEFAULT). H200, 2026-12-05, B4 H16 N4k dense: d128 81.8 TFLOP/s, d64 77.7 (the
# mma kernel 51.6 and 55.9; flash_fwd_wgmma_f32.cu, the kernel it replaced, 67.3 and 70.3: one
# block of two warpgroups an SM splitting and transposing the tiles between the MMAs, in git
# history); before the score groups of 4 k-steps d96 78.5, d40 at 48: 51.9 (44.0 at 64).
# Its bounds go in steps of 16 where that pays: d in 41..48 computes 48 columns, not 64 (issue 4:
# d = 40 ran at 0.63x d = 64's rate at the bound 64, 0.69x at 48), and d in 33..40 computes 40
# (m64n40k8: its Kj tile is 2.5 chunks a producer thread, its Sij one score group of 5 k-steps).
# (48, 64): 64-key tiles made ptxas spill and (at 48) serialize the MMAs for want of registers.
WGMMA_F32_WS_TILES = ((40, (32, 3, 3)), (48, (32, 3, 3)), (64, (32, 3, 3)), (96, (32, 2, 2)),
                      (128, (32, 2, 1)))
WGMMA_SM_SMEM = 228 * 1024   # shared memory of one sm_90 SM, 1 KB of it reserved per resident block
# Whether plan(wgmma=None) picks the wgmma kernels where they can run (on since their gpu tests
# passed on an H200: fp16/bf16 2026-12-02, float32 2026-12-04); wgmma_default(on) sets it for a block of calls (the benchmark's comparison with the
# mma kernel on the same call).
WGMMA_BY_DEFAULT = True


@contextlib.contextmanager
def _default(flag: str, on: bool):
    """The module's `flag` set to `on` within the block (cached plans dropped on the way in and out)."""
    before = globals()[flag]
    globals()[flag] = on
    cached_plan.cache_clear()
    try:
        yield
    finally:
        globals()[flag] = before
        cached_plan.cache_clear()


def decode_default(on: bool):
    """DECODE_BY_DEFAULT set to `on` within a `with` block: with False, every call in the block
    runs the one-pass kernels."""
    return _default("DECODE_BY_DEFAULT", on)


def wgmma_default(on: bool):
    """WGMMA_BY_DEFAULT set to `on` within a `with` block: with True, calls in the block run the
    wgmma kernel where it can run; with False, the mma.sync kernel."""
    return _default("WGMMA_BY_DEFAULT", on)


# (largest D, (warps NW, key tile BC, pipeline stages) candidates, best first). Every warp takes
# BC / NW keys of a tile (a multiple of 16). Decoding streams K and V once, so what counts is the
# bytes in flight an SM: one block of 2 warps (4 at D <= 64) with three tiles of K + V in flight
# streams fastest. H200 sweep with swizzled tiles (fp16 32 / 8 heads, one query row, us): d128
# B8 Nk32k / B1 Nk128k / B2 Nk64k: (2, 64, 4) 251.9 / 135.8 / 134.2, (2, 128, 3) 252.3 / 136.9 /
# 135.9, (4, 128, 3) 253.4 / 138.4 / 136.8, (2, 64, 3) two blocks an SM 253.7 / 141.6 / 137.2,
# (4, 64, 3) 256.6 / 144.2 / 139.8, (8, 128, 2) 262.7 / 147.1 / 145.7, (4, 64, 2) 282.9 / 174.6 /
# 164.6; d64 B8 Nk32k: (4, 128, 4) 133.6, (2, 128, 3) 134.1, (2, 64, 6) 134.6, (4, 64, 4) 136.2,
# (4, 64, 3) 136.4. (2, 64, 4) also fits an A100's 163 KB. Smaller devices get fewer stages, then
# smaller tiles (down to one warp of 16 keys, D = 256 within 48 KB).
DECODE_TILES = ((64, ((4, 128, 4), (4, 64, 4), (4, 64, 3), (4, 64, 2), (2, 32, 2), (1, 16, 2))),
                (256, ((2, 64, 4), (4, 64, 3), (4, 64, 2), (2, 32, 2), (1, 16, 2))))
# A paged KV cache whose pages are shorter than the key tile has its tiles' rows looked up page by
# page, each thread its rows' page numbers before its copies; there the first candidate of at most
# 64 keys on at least 4 warps that fits goes on (at most 8 lookups a thread a tile at D = 128):
# d128 B8 Nk32k pages of 16 took 507 us on (2, 64, 4) (16 a thread) and 489 on (2, 128, 3) (32; of
# 64: 458) against (4, 64, 3)'s 258 (285 and 272 with padded tiles; BENCHMARKS.md, session 15).
DECODE_PAGED_MAX_BC = 64
DECODE_PAGED_MIN_WARPS = 4
# The page sizes a decoding tile choice can differ for (0: not paged), for cuda_variants.
DECODE_PAGES = (0, 1, 16, 64, 256)


@dataclass(frozen=True)
class Plan:
    """What one call will run. Prints itself for the demo, `info` and the tests."""

    backend: str                 # "c" or "cuda"
    kernel: str                  # C function name, or the CUDA name expression
    dtype: str
    d: int
    head_dim_bound: int          # D: the kernel's compile-time bound, d <= D
    Br: int
    Bc: int
    causal: bool
    mask: int = 0                # CUDA: the kernels' MASK (MASKS: none, window, window + score mods)
    threads: int = 1             # CUDA: threads per block; C: Python threads sharing the heads
    grid: tuple[int, int, int] = (1, 1, 1)
    smem_bytes: int = 0          # CUDA: dynamic shared memory; C: working-set bytes
    smem_limit: int = 0
    splits: int = 0              # split-KV decoding: key splits per (batch, k/v head); 0 = not decoding
    combine: str = ""            # decoding: the kernel that merges the splits; "" where flash_decode does
    workspace_bytes: int = 0     # decoding: the splits' partial O and L (float32), from CuPy's pool

    def __str__(self) -> str:
        if self.backend == "c":
            return (f"c {self.kernel}: Br={self.Br}, Bc={self.Bc}, d={self.d}, "
                    f"causal={self.causal}, working set {self.smem_bytes / 1024:.2f} KB per thread, "
                    f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        text = (f"cuda {self.kernel}: grid {self.grid} x {self.threads} threads, "
                f"Br={self.Br}, Bc={self.Bc}, d={self.d} (compiled for {self.head_dim_bound}), "
                f"shared memory {self.smem_bytes / 1024:.2f} KB of {self.smem_limit / 1024:.2f} KB")
        if self.splits:
            merged = f"merged by {self.combine}" if self.combine else "merged in the kernel"
            text += (f"; {self.splits} key split{'s' if self.splits > 1 else ''} {merged}, "
                     f"workspace {self.workspace_bytes / 1024:.2f} KB")
        return text


def seed_budget_floats(Br: int, Bc: int, d: int) -> int:
    """The seed's on-chip budget M >= 2 Bc d + 2 Br d + 6 Br + 2 Br Bc, in floats."""
    return 2 * Bc * d + 2 * Br * d + 6 * Br + 2 * Br * Bc


def simt_smem_bytes(Br: int, Bc: int, D: int) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_simt.cu (fp32 everywhere):
    Qi[Br][D], Kj[Bc][D+1], Vj[Bc][D], Sij[Br][Bc+1], Oi[Br][D], mi, li, alpha[Br]."""
    floats = Br * D + Bc * (D + 1) + Bc * D + Br * (Bc + 1) + Br * D + 3 * Br
    return 4 * floats


def fma_smem_bytes(Br: int, Bc: int, D: int) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_fma.cu (fp32 everywhere): Qi^T [D][Br+4],
    Kj^T [D][Bc+4], Vj [Bc][D+8], Pij^T [Bc][Br]."""
    return 4 * (D * (Br + 4) + D * (Bc + 4) + Bc * (D + 8) + Bc * Br)


def mma_smem_bytes(Br: int, Bc: int, D: int, itemsize: int = 2) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_mma.cu: Qi[Br], Kj[Bc], Vj[Bc] rows of
    D elements and a 16-byte pad (which keeps ldmatrix free of bank conflicts)."""
    return (Br + 2 * Bc) * (D * itemsize + 16)


def wgmma_smem_bytes(Br: int, Bc: int, D: int) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_wgmma.cu: 1 KB of slack to align the swizzled
    tiles on 1024 bytes, Qi [Br][D] and two buffers of (Kj, Vj [Bc][D]), in 16-bit elements."""
    return 1024 + 2 * D * (Br + 4 * Bc)


def wgmma_f32_ws_smem_bytes(Bc: int, k_stages: int, v_stages: int, D: int) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_wgmma_f32_ws.cu: 1 KB of alignment slack, in
    fp32 Qi [128][Dp] and its lo, `k_stages` buffers of Kj's hi and lo rows [2 Bc][Dp], `v_stages`
    of Vj^T's hi and lo [D][Bc] each, then 2 + 2 (k_stages + v_stages) mbarriers; Dp is D rounded
    up to whole 128-byte panels (32 floats)."""
    Dp = head_dim_bound(D)
    return 1024 + 8 * Dp * (128 + k_stages * Bc) + 8 * D * v_stages * Bc + 8 * (2 + 2 * (k_stages + v_stages))


def wgmma_f32_ws_bound(d: int) -> int | None:
    """The warp-specialized fp32 kernel's head-dim bound for d: the smallest of its bounds >= d;
    None past the largest and for d <= 32, which the mma kernel keeps."""
    return min((d_max for d_max, _ in WGMMA_F32_WS_TILES if d_max >= d), default=None) if d > 32 else None


def wgmma_f32_ws_tiles(D: int, smem_limit: int) -> tuple[int, int, int] | None:
    """(Bc, Kj buffers, Vj buffers) of the warp-specialized fp32 kernel for D if it fits, None if not."""
    tiles = next((c for d_max, c in WGMMA_F32_WS_TILES if D == d_max), None)
    return tiles if tiles and wgmma_f32_ws_smem_bytes(*tiles, D) <= smem_limit else None


def wgmma_tiles(D: int, smem_limit: int) -> tuple[int, int] | None:
    """(warpgroups, Bc) of the first wgmma candidate for D that fits, None if none (or D has none)."""
    candidates = next((c for d_max, c in WGMMA_TILES if D == d_max), ())
    return next((c for c in candidates if wgmma_smem_bytes(64 * c[0], c[1], D) <= smem_limit), None)


def mma_arch(arch: int, dtype: str) -> int | None:
    """The tensor-core instruction set (80 or 75) for this device and dtype, None if none."""
    for isa in (80, 75):
        if arch >= isa and dtype in MMA_DTYPES[isa]:
            return isa
    return None


def mma_tiles(D: int, smem_limit: int, itemsize: int = 2) -> tuple[int, int, int, int] | None:
    """(warps, m-tiles per warp, Bc, Br) of the first candidate for D that fits the limit,
    None if none does."""
    table = MMA_TILES if itemsize == 2 else MMA_TILES_F32
    candidates = next(c for d_max, c in table if D <= d_max)
    for warps, mt, Bc in candidates:
        if mma_smem_bytes(16 * mt * warps, Bc, D, itemsize) <= smem_limit:
            return warps, mt, Bc, 16 * mt * warps
    return None


def head_dim_bound(d: int, step: int = HEAD_DIM_STEP) -> int:
    return step * math.ceil(d / step)


def fma_tiles(D: int, smem_limit: int) -> tuple[int, int, int] | None:
    """(Br, Bc, RM) of the register-tiled CUDA-core kernel for head-dim bound D: its first
    candidate that fits the limit, None if none does (flash_fwd_simt.cu then runs)."""
    candidates = next((c for d_max, c in FMA_TILES if D <= d_max), ())
    return next((t for t in candidates if fma_smem_bytes(t[0], t[1], D) <= smem_limit), None)


def simt_tiles(D: int, smem_limit: int) -> tuple[int, int, int]:
    """(Br, Bc, threads) of the largest square tile whose layout fits the limit."""
    for tile in TILE_CANDIDATES:
        if simt_smem_bytes(tile, tile, D) <= smem_limit:
            return tile, tile, (256 if tile >= 32 else 128)
    raise ValueError(f"no tile fits a head-dim bound of {D} in {smem_limit} bytes of shared memory")


def decode_smem_bytes(NW: int, BC: int, stages: int, D: int) -> int:
    """Exact dynamic shared memory of csrc/flash_decode.cu: 128 bytes of slack to align it, Qi[16]
    in rows of D halves and a 16-byte pad, STAGES x (Kj[BC], Vj[BC]) in 128-byte swizzled panels
    (ceil(D / 64) of 128 bytes a row), then each warp's row max and sum (float32 [NW][16] each)."""
    return 128 + 16 * (2 * D + 16) + decode_stage_bytes(BC, stages, D) + 2 * NW * 16 * 4


def decode_stage_bytes(BC: int, stages: int, D: int) -> int:
    """Bytes of csrc/flash_decode.cu's K/V stages: STAGES x (Kj, Vj), each BC rows of ceil(D / 64)
    128-byte panels (after the sweep: the merged Oi, and the fused merge's partials)."""
    return 2 * stages * BC * 128 * math.ceil(D / 64)


def decode_tiles(D: int, smem_limit: int, page: int = 0) -> tuple[int, int, int] | None:
    """(warps, key tile BC, stages) of the first decoding candidate for D that fits, None if none;
    page: a paged KV cache's keys a page (0: not paged). Pages shorter than a candidate's tile
    take it only with at most DECODE_PAGED_MAX_BC keys on at least DECODE_PAGED_MIN_WARPS warps,
    while one such fits (else the first that fits)."""
    candidates = next(c for d_max, c in DECODE_TILES if D <= d_max)
    fits = [c for c in candidates if decode_smem_bytes(*c, D) <= smem_limit]
    paged_ok = [c for c in fits if not (0 < page < c[1] and (c[1] > DECODE_PAGED_MAX_BC
                                                              or c[0] < DECODE_PAGED_MIN_WARPS))]
    choices = paged_ok or fits
    return choices[0] if choices else None


@functools.lru_cache(maxsize=1024)   # a decoding loop asks again for each key tile's Nk
def decode_splits(pairs: int, slots: int, tiles: int) -> int:
    """Key splits per (batch, k/v head) for `pairs` such blocks' worth of work, `slots` blocks the
    GPU runs at once (SMs x blocks an SM holds) and `tiles` key tiles: FlashAttention-2's
    num_splits_heuristic. Enough pairs to fill 80% of the slots: no split. Otherwise the fewest
    splits whose last wave is at least 85% as full as the best count's (n_waves / ceil(n_waves),
    n_waves = pairs * splits / slots), counting only split counts that change the tiles per split;
    at most DECODE_MAX_SPLITS, slots, and one split per DECODE_MIN_TILES_PER_SPLIT tiles. Where
    that is a single wave, the most splits that still are: a streaming kernel leaves an SM's
    empty slot idle for the whole call (B1 32/8 heads Nk 128k on an H200: 29 -> 33 splits,
    every slot of 132 SMs x 2 busy, BENCHMARKS.md)."""
    if pairs >= 0.8 * slots:
        return 1
    most = max(1, min(DECODE_MAX_SPLITS, slots, tiles // DECODE_MIN_TILES_PER_SPLIT))
    efficiency = {}
    for splits in range(1, most + 1):
        if splits == 1 or -(-tiles // splits) != -(-tiles // (splits - 1)):
            waves = pairs * splits / slots
            efficiency[splits] = waves / math.ceil(waves)
    best = max(efficiency.values())
    splits = next(s for s, e in efficiency.items() if e >= 0.85 * best)
    if pairs * splits <= slots:
        splits = max(s for s in efficiency if pairs * s <= slots)
    return splits


def decode_workspace_bytes(batch: int, heads: int, Nq: int, splits: int, D: int) -> int:
    """The decoding workspace: each query row's O_s (D floats) and L_s (one float) per split;
    none for one split (its block writes O and L)."""
    return 4 * batch * heads * Nq * splits * (D + 1) if splits > 1 else 0


def combine_name(dtype: str) -> str:
    """The name expression of the kernel that merges decoding's splits where flash_decode does not."""
    return f"flash_decode_combine<{CUDA_TYPES[dtype]}>"


def decode_fused_merge(rows: int, splits: int, tiles: tuple[int, int, int], D: int) -> bool:
    """Whether flash_decode merges a pair's splits itself (its last split to finish, no combine
    launch): one split always; more where the pair has at most DECODE_FUSED_MAX_ROWS query rows
    (group x Nq) and their partials (rows x splits x (D + 1) floats) fit in the K/V stages."""
    _, BC, stages = tiles
    return splits == 1 or (rows <= DECODE_FUSED_MAX_ROWS and
                           4 * rows * splits * (D + 1) <= decode_stage_bytes(BC, stages, D))


def decode_fits(Nq: int, group: int, dtype: str, arch: int, D: int, smem_limit: int,
                page: int = 0) -> tuple[int, int, int] | None:
    """Decoding's (warps, key tile, stages) where split-KV decoding can run a call: fp16/bf16 on
    sm_80+, at most DECODE_MAX_ROWS query rows per k/v head, a tile within the limit (for a paged
    cache's page, as decode_tiles); else None."""
    if dtype not in DECODE_DTYPES or arch < 80 or group * Nq > DECODE_MAX_ROWS:
        return None
    return decode_tiles(D, smem_limit, page)


def use_decode(Nq: int, Nk: int, group: int, dtype: str, arch: int) -> bool:
    """Whether split-KV decoding pays (plan's decode=None): few query rows per k/v head
    (group * Nq <= DECODE_MAX_ROWS), enough keys, fp16/bf16 on sm_80+."""
    return (dtype in DECODE_DTYPES and arch >= 80 and group * Nq <= DECODE_MAX_ROWS
            and Nk >= DECODE_MIN_KEYS)


def plan(Nq: int, Nk: int, d: int, *, dtype: str = "float32", causal: bool = False,
         batch: int = 1, heads: int = 1, backend: str = "cuda",
         smem_limit: int | None = None, arch: int | None = None, num_threads: int = 1,
         fp32: str = "auto", window: bool = False, score_mod: bool = False, group: int = 1,
         sm_count: int | None = None, decode: bool | None = None, wgmma: bool | None = None,
         page: int = 0) -> Plan:
    """Choose the tiles and launch shape for one call.

    The call's shapes: q (batch, heads, Nq, d), k and v (batch, heads, Nk, d); dtype is q's
    ("float32", "float64", "float16" or "bfloat16"). backend "c" runs the batch * heads problems on min(num_threads, batch * heads) Python
    threads, each calling the single-threaded C twin on a contiguous slice of them.
    backend "cuda" needs the device's shared-memory limit per block (the opt-in maximum) and
    its compute capability as an int (75 for sm_75); when None they are read from the current
    CuPy device. Passing a smaller arch plans for an older GPU: such a plan runs on newer ones.
    fp32 (float32 only): "auto" (3xTF32 tensor cores on sm_80+, else "simt"), "3xtf32",
    "tf32" (falls back to "simt" before sm_80) or "simt" (the CUDA-core kernel).
    window: a sliding window masks keys (causal is one; for CUDA the mask variant runs either);
    score_mod: softcap or ALiBi change the scores (the CUDA variant that applies them).
    group: q heads per k/v head (GQA/MQA; heads is q's). sm_count: the device's SMs (read from
    the current device when None and needed), for the number of key splits when decoding.
    decode: split-KV decoding (csrc/flash_decode.cu): None chooses it when use_decode() says it
    pays (while DECODE_BY_DEFAULT is on), True asks for it (a ValueError where it cannot run),
    False never. wgmma: Hopper's warpgroup-MMA kernels (csrc/flash_fwd_wgmma.cu for fp16/bf16,
    csrc/flash_fwd_wgmma_f32_ws.cu for float32 as 3xTF32) in place of the mma.sync one: None where
    they can run (while WGMMA_BY_DEFAULT is on), True asks for them (a ValueError where they
    cannot), False never. page: when decoding reads a paged KV cache
    (kvcache.py), its keys a page, which the decoding tile depends on (decode_tiles); 0 otherwise.
    """
    if not (1 <= d <= MAX_HEAD_DIM):
        raise ValueError(f"head dim d must be in 1..{MAX_HEAD_DIM}, got {d}")
    if min(Nq, Nk, batch, heads, num_threads, group) < 1 or heads % group:
        raise ValueError("Nq, Nk, batch, heads, num_threads and group must all be >= 1, group dividing heads")
    if page < 0:
        raise ValueError(f"page (a paged KV cache's keys a page, 0 if not paged) must be >= 0, got {page}")
    if backend == "c":
        if decode:
            raise ValueError("split-KV decoding (decode=True) runs on the CUDA backend only")
        if dtype not in C_TYPES:
            raise ValueError(f"the C backend takes {sorted(C_TYPES)}, got {dtype}")
        Br, Bc = next((Br, Bc) for d_max, Br, Bc in C_TILE_FOR_HEAD_DIM if d <= d_max)
        itemsize = 8 if dtype == "float64" else 4
        work = itemsize * (2 * (Br + Bc) * d + Br * Bc)   # Qi, Oi, Kj, Vj and Sij
        return Plan("c", f"flash_fwd_{C_TYPES[dtype]}", dtype, d, d, Br, Bc, causal,
                    threads=min(num_threads, batch * heads), smem_bytes=work)
    if backend != "cuda":
        raise ValueError(f"plan() takes backend 'c' or 'cuda', got {backend!r}")
    if decode and backend == "cuda" and dtype not in DECODE_DTYPES:
        raise ValueError(f"split-KV decoding takes {' or '.join(DECODE_DTYPES)}, got {dtype}")
    if num_threads != 1:
        raise ValueError(f"num_threads applies to the C backend only, got {num_threads} for {backend!r}")
    if dtype not in CUDA_TYPES:
        raise ValueError(f"the CUDA backend takes {sorted(CUDA_TYPES)}, got {dtype}")
    if smem_limit is None or arch is None:
        from . import _device
        smem_limit = _device.smem_limit() if smem_limit is None else smem_limit
        arch = _device.compute_capability() if arch is None else arch
    if fp32 not in FP32_MODES:
        raise ValueError(f"fp32 must be one of {FP32_MODES}, got {fp32!r}")
    if fp32 == "3xtf32" and dtype == "float32" and arch < 80:
        raise ValueError(f"fp32='3xtf32' needs TF32 tensor cores (sm_80 or later), not sm_{arch}")
    D = head_dim_bound(d)
    mask = 2 if score_mod else 1 if causal or window else 0
    if decode or (decode is None and DECODE_BY_DEFAULT and use_decode(Nq, Nk, group, dtype, arch)):
        dtiles = decode_fits(Nq, group, dtype, arch, D, smem_limit, page)
        if dtiles is None:
            if decode:
                raise ValueError(f"split-KV decoding needs sm_80 or later (got sm_{arch}), at most "
                                 f"{DECODE_MAX_ROWS} query rows per k/v head (got group * Nq = {group * Nq}) "
                                 f"and a tile within {smem_limit} bytes of shared memory")
        else:
            return _decode_plan(Nq, Nk, d, D, dtype, causal, mask, batch, heads, group, dtiles,
                                smem_limit, sm_count)
    passes = 1 if fp32 == "tf32" else 3
    wtiles = wgmma_tiles(D, smem_limit) if arch == WGMMA_ARCH and dtype in WGMMA_DTYPES else None
    # the fp32 kernel: d in 33..128, its own bounds and tiles
    Dw = wgmma_f32_ws_bound(d) if arch == WGMMA_ARCH and dtype == "float32" and fp32 in ("auto", "3xtf32") \
        else None
    fws = wgmma_f32_ws_tiles(Dw, smem_limit) if Dw is not None else None
    if wgmma and wtiles is None and fws is None:
        raise ValueError(f"the wgmma kernels (wgmma=True) need sm_{WGMMA_ARCH} (got sm_{arch}), "
                         f"{' or '.join(WGMMA_DTYPES)} or float32 as 3xTF32 (got {dtype}, fp32={fp32!r}) "
                         f"and d in 33..64 or 97..128 (float32 also 65..96; got {d}), with tiles that fit "
                         f"{smem_limit} bytes of shared memory a block")
    if wgmma or (wgmma is None and WGMMA_BY_DEFAULT):   # fp32 (3xTF32) or fp16/bf16: at most one has tiles
        if fws is not None and Dw is not None:
            (Bc, k_stages, v_stages), smem = fws, wgmma_f32_ws_smem_bytes(*fws, Dw)
            name = f"flash_fwd_wgmma_f32_ws<{Dw}, {Bc}, {k_stages}, {v_stages}, {mask}>"
            grid = (math.ceil(Nq / 128), min(heads, GRID_YZ_MAX), min(batch, GRID_YZ_MAX))
            return Plan("cuda", name, dtype, d, Dw, 128, Bc, causal, mask, WGMMA_WS_THREADS, grid, smem,
                        smem_limit)
        if wtiles is not None:
            (groups, Bc), smem = wtiles, wgmma_smem_bytes(64 * wtiles[0], wtiles[1], D)
            name = f"flash_fwd_wgmma<{CUDA_TYPES[dtype]}, {D}, {groups}, {Bc}, {mask}>"
            grid = (math.ceil(Nq / (64 * groups)), min(heads, GRID_YZ_MAX), min(batch, GRID_YZ_MAX))
            return Plan("cuda", name, dtype, d, D, 64 * groups, Bc, causal, mask, 128 * groups, grid, smem,
                        smem_limit)
    isa = mma_arch(arch, dtype)
    itemsize = 4 if dtype == "float32" else 2
    Dm = head_dim_bound(d, MMA_HEAD_DIM_STEP)
    tiles = mma_tiles(Dm, smem_limit, itemsize) if isa is not None else None
    if dtype == "float32" and fp32 == "simt":
        tiles = None
    if tiles is not None:
        warps, mt, Bc, Br = tiles
        D = Dm
        threads = 32 * warps
        passes = 1 if dtype != "float32" else passes
        name = (f"flash_fwd_mma<{CUDA_TYPES[dtype]}, {D}, {warps}, {mt}, {Bc}, {mask}, {isa}, "
                f"{passes}>")
        smem = mma_smem_bytes(Br, Bc, D, itemsize)
    elif dtype == "float32" and arch >= FMA_MIN_ARCH and (ftl := fma_tiles(D, smem_limit)) is not None:
        Br, Bc, rm = ftl
        threads = Br // rm * 16
        name = f"flash_fwd_fma<{D}, {Br}, {Bc}, {rm}, {mask}>"
        smem = fma_smem_bytes(Br, Bc, D)
    else:
        Br, Bc, threads = simt_tiles(D, smem_limit)
        name = f"flash_fwd_simt<{CUDA_TYPES[dtype]}, {Br}, {Bc}, {D}, {threads}, {mask}>"
        smem = simt_smem_bytes(Br, Bc, D)
    grid = (math.ceil(Nq / Br), min(heads, GRID_YZ_MAX), min(batch, GRID_YZ_MAX))
    return Plan("cuda", name, dtype, d, D, Br, Bc, causal, mask, threads, grid, smem, smem_limit)


def _decode_plan(Nq, Nk, d, D, dtype, causal, mask, batch, heads, group, tiles, smem_limit, sm_count) -> Plan:
    NW, BC, stages = tiles
    if sm_count is None:
        from . import _device
        sm_count = _device.sm_count()
    smem = decode_smem_bytes(NW, BC, stages, D)
    slots = sm_count * max(1, min(4, smem_limit // smem))
    kv_heads = heads // group
    splits = decode_splits(batch * kv_heads, slots, math.ceil(Nk / BC))
    name = f"flash_decode<{CUDA_TYPES[dtype]}, {D}, {NW}, {BC}, {stages}, {mask}>"
    grid = (splits, min(kv_heads, GRID_YZ_MAX), min(batch, GRID_YZ_MAX))
    combine = "" if decode_fused_merge(group * Nq, splits, tiles, D) else combine_name(dtype)
    return Plan("cuda", name, dtype, d, D, 16, BC, causal, mask, 32 * NW, grid, smem, smem_limit, splits,
                combine, decode_workspace_bytes(batch, heads, Nq, splits, D))


# The API's entry point: plan() memoized, so a small call does not pay for planning again.
# Only for explicit smem_limit and arch (the API always passes them): with None, plan() reads
# the current device, which a cache must not remember.
cached_plan = functools.lru_cache(maxsize=4096)(plan)


def cuda_variants(smem_limit: int, arch: int) -> list[str]:
    """Every kernel name expression the planner can emit for this shared-memory limit and arch."""
    names = set()
    for d in range(8, MAX_HEAD_DIM + 1, 8):   # every bound of every kernel (the fp32 wgmma one's 40 too)
        for dtype in CUDA_TYPES:
            for mask in MASKS:
                for fp32 in (FP32_MODES if dtype == "float32" else ("auto",)):
                    if fp32 == "3xtf32" and arch < 80:
                        continue
                    Dw = wgmma_f32_ws_bound(d)
                    can_wgmma = arch == WGMMA_ARCH and (
                        wgmma_tiles(head_dim_bound(d), smem_limit) if dtype in WGMMA_DTYPES else
                        fp32 in ("auto", "3xtf32") and Dw is not None and wgmma_f32_ws_tiles(Dw, smem_limit))
                    for wgmma in (True, False) if can_wgmma else (False,):   # whatever the default
                        names.add(plan(1, 1, d, dtype=dtype, window=mask >= 1, score_mod=mask == 2,
                                       smem_limit=smem_limit, arch=arch, fp32=fp32, wgmma=wgmma).kernel)
                for page in DECODE_PAGES:
                    if dtype in DECODE_DTYPES and arch >= 80 and decode_tiles(head_dim_bound(d), smem_limit, page):
                        p = plan(1, DECODE_MIN_KEYS, d, dtype=dtype, window=mask >= 1, score_mod=mask == 2,
                                 smem_limit=smem_limit, arch=arch, sm_count=1, decode=True, page=page)
                        names.update((p.kernel, combine_name(dtype)))   # whichever merges
    return sorted(names)
