"""The demo: `python -m flashattn_cupy`. Runs the C twin and, when a GPU is usable, the CUDA
kernel on seeded random inputs, printing samples of O and L like the seed write-up did, the
plan that ran, the time, and the largest error against the float64 reference."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import __version__, _device, flash_attention, plan_for, reference


def _inputs(N: int, d: int, dtype, seed: int):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((N, d), dtype=np.float32).astype(dtype) for _ in range(3))


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(x):.4f}" for x in values) + "]"


def _report(q, k, v, O, L, causal: bool, seconds: str) -> None:
    O_ref, L_ref = reference.attention(q, k, v, causal=causal)
    finite = np.isfinite(L_ref)
    err_O = float(np.abs(O.astype(np.float64) - O_ref).max())
    err_L = float(np.abs(L[finite] - L_ref[finite]).max()) if finite.any() else 0.0
    print("Sample outputs:")
    print(f"  O[0][0:5] = {_fmt(O[0][:5])}")
    print(f"  L[0:5] = {_fmt(L[:5])}")
    print(f"Time: {seconds}")
    print(f"Max error vs float64 reference: O {err_O:.2e}, L {err_L:.2e}")


def run_c(N: int, d: int, causal: bool, seed: int, dtype: str) -> None:
    print("C twin (CPU, one thread)")
    print("-" * 70)
    if dtype not in ("float32", "float64"):
        print(f"skipped: the C twin takes float32 or float64, not {dtype}")
        return
    q, k, v = _inputs(N, d, dtype, seed)
    plan = plan_for(q, k, v, causal=causal, backend="c")
    assert plan is not None   # only backend="reference" runs without a plan
    print(f"N={N}, d={d}, Br={plan.Br}, Bc={plan.Bc}, causal={causal}, {dtype}")
    start = time.perf_counter()
    O, L = flash_attention(q, k, v, causal=causal, return_lse=True, backend="c")
    elapsed = time.perf_counter() - start
    _report(q, k, v, O, L, causal, f"{elapsed * 1e3:.2f} ms")


def run_cuda(N: int, d: int, causal: bool, seed: int, dtype: str) -> None:
    print("CUDA (GPU)")
    print("-" * 70)
    why = _device.gpu_unavailable_reason()
    if why:
        print(f"skipped: no usable GPU ({why})")
        return
    if dtype == "float64":
        print("skipped: the CUDA kernels take float32, float16 or bfloat16, not float64")
        return
    cp = _device.cupy()
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    q, k, v = _inputs(N, d, dtype, seed)
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    plan = plan_for(qd, kd, vd, causal=causal)
    assert plan is not None
    print(f"Device: {_device.describe(qd.device.id)}")
    print(f"N={N}, d={d}, Br={plan.Br}, Bc={plan.Bc}, causal={causal}, {np.dtype(dtype).name}")
    print(f"Grid: {plan.grid[0] * plan.grid[1] * plan.grid[2]} blocks {plan.grid} x {plan.threads} threads, "
          f"Shared mem: {plan.smem_bytes / 1024:.2f} KB (Limit: {plan.smem_limit / 1024:.2f} KB)")
    print(f"Kernel: {plan.kernel}")
    start = time.perf_counter()
    flash_attention(qd, kd, vd, causal=causal)   # compiles with NVRTC, or loads the kernel cache
    cp.cuda.Device().synchronize()
    first = time.perf_counter() - start
    begin, end = cp.cuda.Event(), cp.cuda.Event()
    begin.record()
    repeats = 20
    for _ in range(repeats):
        O, L = flash_attention(qd, kd, vd, causal=causal, return_lse=True)
    end.record()
    end.synchronize()
    per_call = cp.cuda.get_elapsed_time(begin, end) / repeats
    _report(q, k, v, cp.asnumpy(O), cp.asnumpy(L), causal,
            f"{per_call:.3f} ms per call (mean of {repeats}); first call {first * 1e3:.0f} ms "
            "(NVRTC compile or kernel-cache load)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench
        return bench.main(argv[1:])
    if argv[:1] == ["info"]:
        from . import info
        return info.main(argv[1:])
    if argv[:1] == ["clear-cache"]:
        from . import kernel_cache
        return kernel_cache.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m flashattn_cupy",
        description="FlashAttention-2 forward demo: the C twin on the CPU, then the CUDA kernel "
                    "when a GPU is usable (skipped with a message otherwise). Inputs are seeded "
                    "standard-normal (N, d) matrices; errors are against the float64 reference. "
                    "`python -m flashattn_cupy bench --device cpu|gpu` runs the benchmarks instead, "
                    "`python -m flashattn_cupy info` says what this installation can run, "
                    "`python -m flashattn_cupy clear-cache` removes our compiled kernels from the kernel cache.")
    parser.add_argument("--n", type=int, default=None,
                        help="sequence length N (default: 256 for C and 512 for CUDA, as in the seed)")
    parser.add_argument("--d", type=int, default=64, help="head dimension, 1..256 (default 64)")
    parser.add_argument("--causal", action="store_true", help="apply the causal mask")
    parser.add_argument("--backend", choices=("all", "c", "cuda"), default="all",
                        help="which backends to run (default: all)")
    parser.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                        default="float32", help="input dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be >= 1")
    if not 1 <= args.d <= 256:
        parser.error("--d must be in 1..256")

    print("=" * 70)
    print(f"FlashAttention-2 Algorithm 1 - flashattn_cupy {__version__}")
    print("=" * 70)
    if args.backend in ("all", "c"):
        run_c(args.n or 256, args.d, args.causal, args.seed, args.dtype)
        print()
    if args.backend in ("all", "cuda"):
        run_cuda(args.n or 512, args.d, args.causal, args.seed, args.dtype)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
