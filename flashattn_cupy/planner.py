"""The planner: the one place that chooses tiles and launch shapes.

Kernels never guess. Given the problem's sizes, dtype and causal flag, and for the GPU
the device's shared-memory limit, `plan()` returns a frozen, printable `Plan` that says
exactly what will run: tile sizes Br x Bc, the head-dim bound the kernel is compiled for,
threads per block (for C: Python threads), grid, and shared-memory bytes (the CUDA
kernel's exact layout; for C, the tiles' working set).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# dtype name -> the kernels' element type (csrc/fa_dtypes.cuh)
CUDA_TYPES = {"float32": "float", "float16": "fa_half", "bfloat16": "fa_bfloat16"}
C_TYPES = {"float32": "f32", "float64": "f64"}

MAX_HEAD_DIM = 256
HEAD_DIM_STEP = 32         # kernels are compiled for d rounded up to a multiple of this
TILE_CANDIDATES = (64, 32, 16, 8)   # Br = Bc, largest first
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
# 128 x 64 at d = 64 and 128 x 32 at d = 128, 4-40% ahead of one m-tile a warp.
MMA_TILES_F32 = ((64, ((4, 2, 64), (4, 2, 32), (4, 1, 32), (2, 1, 16))),
                 (128, ((4, 2, 32), (4, 1, 32), (2, 1, 16), (1, 1, 16))),
                 (256, ((4, 1, 32), (4, 1, 16), (2, 1, 16), (1, 1, 16))))


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

    def __str__(self) -> str:
        if self.backend == "c":
            return (f"c {self.kernel}: Br={self.Br}, Bc={self.Bc}, d={self.d}, "
                    f"causal={self.causal}, working set {self.smem_bytes / 1024:.2f} KB per thread, "
                    f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return (f"cuda {self.kernel}: grid {self.grid} x {self.threads} threads, "
                f"Br={self.Br}, Bc={self.Bc}, d={self.d} (compiled for {self.head_dim_bound}), "
                f"shared memory {self.smem_bytes / 1024:.2f} KB of {self.smem_limit / 1024:.2f} KB")


def seed_budget_floats(Br: int, Bc: int, d: int) -> int:
    """The seed's on-chip budget M >= 2 Bc d + 2 Br d + 6 Br + 2 Br Bc, in floats."""
    return 2 * Bc * d + 2 * Br * d + 6 * Br + 2 * Br * Bc


def simt_smem_bytes(Br: int, Bc: int, D: int) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_simt.cu (fp32 everywhere):
    Qi[Br][D], Kj[Bc][D+1], Vj[Bc][D], Sij[Br][Bc+1], Oi[Br][D], mi, li, alpha[Br]."""
    floats = Br * D + Bc * (D + 1) + Bc * D + Br * (Bc + 1) + Br * D + 3 * Br
    return 4 * floats


def mma_smem_bytes(Br: int, Bc: int, D: int, itemsize: int = 2) -> int:
    """Exact dynamic shared memory of csrc/flash_fwd_mma.cu: Qi[Br], Kj[Bc], Vj[Bc] rows of
    D elements and a 16-byte pad (which keeps ldmatrix free of bank conflicts)."""
    return (Br + 2 * Bc) * (D * itemsize + 16)


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


def head_dim_bound(d: int) -> int:
    return HEAD_DIM_STEP * math.ceil(d / HEAD_DIM_STEP)


def simt_tiles(D: int, smem_limit: int) -> tuple[int, int, int]:
    """(Br, Bc, threads) of the largest square tile whose layout fits the limit."""
    for tile in TILE_CANDIDATES:
        if simt_smem_bytes(tile, tile, D) <= smem_limit:
            return tile, tile, (256 if tile >= 32 else 128)
    raise ValueError(f"no tile fits a head-dim bound of {D} in {smem_limit} bytes of shared memory")


def plan(Nq: int, Nk: int, d: int, *, dtype: str = "float32", causal: bool = False,
         batch: int = 1, heads: int = 1, backend: str = "cuda",
         smem_limit: int | None = None, arch: int | None = None, num_threads: int = 1,
         fp32: str = "auto", window: bool = False, score_mod: bool = False) -> Plan:
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
    """
    if not (1 <= d <= MAX_HEAD_DIM):
        raise ValueError(f"head dim d must be in 1..{MAX_HEAD_DIM}, got {d}")
    if min(Nq, Nk, batch, heads, num_threads) < 1:
        raise ValueError("Nq, Nk, batch, heads and num_threads must all be >= 1")
    if backend == "c":
        if dtype not in C_TYPES:
            raise ValueError(f"the C backend takes {sorted(C_TYPES)}, got {dtype}")
        Br, Bc = next((Br, Bc) for d_max, Br, Bc in C_TILE_FOR_HEAD_DIM if d <= d_max)
        itemsize = 8 if dtype == "float64" else 4
        work = itemsize * (2 * (Br + Bc) * d + Br * Bc)   # Qi, Oi, Kj, Vj and Sij
        return Plan("c", f"flash_fwd_{C_TYPES[dtype]}", dtype, d, d, Br, Bc, causal,
                    threads=min(num_threads, batch * heads), smem_bytes=work)
    if backend != "cuda":
        raise ValueError(f"plan() takes backend 'c' or 'cuda', got {backend!r}")
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
    isa = mma_arch(arch, dtype)
    itemsize = 4 if dtype == "float32" else 2
    tiles = mma_tiles(D, smem_limit, itemsize) if isa is not None else None
    if dtype == "float32" and fp32 == "simt":
        tiles = None
    if tiles is not None:
        warps, mt, Bc, Br = tiles
        threads = 32 * warps
        passes = 1 if dtype != "float32" or fp32 == "tf32" else 3
        name = (f"flash_fwd_mma<{CUDA_TYPES[dtype]}, {D}, {warps}, {mt}, {Bc}, {mask}, {isa}, "
                f"{passes}>")
        smem = mma_smem_bytes(Br, Bc, D, itemsize)
    else:
        Br, Bc, threads = simt_tiles(D, smem_limit)
        name = f"flash_fwd_simt<{CUDA_TYPES[dtype]}, {Br}, {Bc}, {D}, {threads}, {mask}>"
        smem = simt_smem_bytes(Br, Bc, D)
    grid = (math.ceil(Nq / Br), min(heads, GRID_YZ_MAX), min(batch, GRID_YZ_MAX))
    return Plan("cuda", name, dtype, d, D, Br, Bc, causal, mask, threads, grid, smem, smem_limit)


# The API's entry point: plan() memoized, so a small call does not pay for planning again.
# Only for explicit smem_limit and arch (the API always passes them): with None, plan() reads
# the current device, which a cache must not remember.
cached_plan = functools.lru_cache(maxsize=4096)(plan)


def cuda_variants(smem_limit: int, arch: int) -> list[str]:
    """Every kernel name expression the planner can emit for this shared-memory limit and arch."""
    names = set()
    for D in range(HEAD_DIM_STEP, MAX_HEAD_DIM + 1, HEAD_DIM_STEP):
        for dtype in CUDA_TYPES:
            for mask in MASKS:
                for fp32 in (FP32_MODES if dtype == "float32" else ("auto",)):
                    if fp32 == "3xtf32" and arch < 80:
                        continue
                    names.add(plan(1, 1, D, dtype=dtype, window=mask >= 1, score_mod=mask == 2,
                                   smem_limit=smem_limit, arch=arch, fp32=fp32).kernel)
    return sorted(names)
