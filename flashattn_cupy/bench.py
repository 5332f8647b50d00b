"""Benchmarks: `python -m flashattn_cupy bench --device cpu|gpu`.

Every rival is measured in the same process on the same inputs, interleaved, and each time
is the best of several runs (robust to a noisy, shared machine). GFLOP/s count the work each
implementation really does: 4·N²·d per head, halved for our causal runs (masked tiles are
skipped) and for SDPA's causal; naive NumPy/CuPy always do all of it. torch is an optional
rival, imported here only, never by the library.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from typing import Any

import numpy as np

from . import flash_attention, plan_for
from .bench_output import sampled_error

_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _best_of(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, the runs interleaved so drift hits all alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def naive_numpy(q, k, v, causal):
    """softmax(q kᵀ / √d) v with the N×N matrix, as a user would write it."""
    S = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if causal:
        S = np.where(np.triu(np.ones(S.shape[-2:], dtype=bool), 1), -np.inf, S)
    S = np.exp(S - S.max(-1, keepdims=True))
    return (S / S.sum(-1, keepdims=True)) @ v


def _two_matmuls(a, b):
    """The 2-thread control: two independent one-thread BLAS calls on two Python threads, the
    calling thread taking one, as the C backend does. Its speed-up says whether the OS gave this
    process two free cores during the run (a shared VM often does not)."""
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(np.matmul, a[1], b[1])
        np.matmul(a[0], b[0])
        other.result()


def _torch_cpu():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def _peak_memory(N: int, d: int, call: str) -> float:
    """MB of peak-RSS growth of one causal `call` at (N, d) beyond its inputs and outputs, in a
    fresh process so the peak belongs to this call alone."""
    code = (
        "import resource, numpy as np\n"
        "from flashattn_cupy import flash_attention\n"
        "from flashattn_cupy.bench import naive_numpy\n"
        f"q, k, v = (np.random.default_rng(i).standard_normal(({N}, {d}), dtype=np.float32) for i in range(3))\n"
        "O = np.empty_like(q); O[:] = 1; L = np.ones(q.shape[0], np.float32)   # outputs' pages\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "del O, L\n"
        f"{call}\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **_ONE_THREAD))
    return float(out.stdout.strip())


def bench_cpu(quick: bool, memory: bool) -> list[str]:
    if any(os.environ.get(key) != value for key, value in _ONE_THREAD.items()):
        # BLAS reads its thread count when NumPy is imported: start again with one thread.
        os.execve(sys.executable, [sys.executable, "-m", "flashattn_cupy", "bench", *sys.argv[2:]],
                  dict(os.environ, **_ONE_THREAD))
    torch = _torch_cpu()
    rng = np.random.default_rng(0)
    repeats = 2 if quick else 5
    heads = 2   # B·H = 2, so num_threads = 2 has a head for each thread
    lines = ["C twin vs naive NumPy (OpenBLAS, 1 thread) vs PyTorch CPU SDPA (1 thread), float32, "
             f"{heads} heads, GFLOP/s on the work each does; best of {repeats} interleaved runs. "
             "The C twin also runs with num_threads=2 (one head per thread); the ratios to the "
             "rivals are one thread against one thread. Control: the speed-up of two 1024^3 "
             "matmuls on two threads over one, measured alongside", "",
             "| d | N | causal | C twin | C twin, 2 threads | NumPy | torch SDPA "
             "| C / NumPy | C / torch | 2 threads / 1 | control |",
             "|" + " --- |" * 11]
    a, b = (rng.standard_normal((2, 1024, 1024), dtype=np.float32) for _ in range(2))
    Ns = (1024,) if quick else (1024, 4096)
    finished, total = 0, 2 * len(Ns) * 2
    for d in (64, 128):
        for N in Ns:
            for causal in (False, True):
                q, k, v = (rng.standard_normal((heads, N, d), dtype=np.float32) for _ in range(3))
                fns = {"c": lambda: flash_attention(q, k, v, causal=causal),
                       "c2": lambda: flash_attention(q, k, v, causal=causal, num_threads=2),
                       "numpy": lambda: naive_numpy(q, k, v, causal),
                       "matmul": lambda: np.matmul(a[0], b[0]), "matmul2": lambda: _two_matmuls(a, b)}
                if torch is not None:
                    # (1, heads, N, d): SDPA's fused CPU kernels take only 4-D inputs, 3-D ones
                    # fall back to the unfused math path (2-7x slower on this machine)
                    tq, tk, tv = (torch.from_numpy(x)[None] for x in (q, k, v))
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    fns["torch"] = lambda: sdpa(tq, tk, tv, is_causal=causal)
                t = _best_of(fns, repeats)
                full = 4 * N * N * d * heads
                done = full / 2 if causal else full   # the flash kernels skip masked tiles
                rate = {name: (full if name == "numpy" else done) / seconds / 1e9
                        for name, seconds in t.items()}
                cells = [f"{rate['c']:.1f}", f"{rate['c2']:.1f}", f"{rate['numpy']:.1f}",
                         f"{rate['torch']:.1f}" if torch else "-", f"{rate['c'] / rate['numpy']:.2f}",
                         f"{rate['c'] / rate['torch']:.2f}" if torch else "-",
                         f"{rate['c2'] / rate['c']:.2f}", f"{2 * t['matmul'] / t['matmul2']:.2f}"]
                lines.append(f"| {d} | {N} | {causal} | " + " | ".join(cells) + " |")
                finished += 1
                print(f"[{finished}/{total}] {lines[-1]}", file=sys.stderr, flush=True)
    if memory:   # the NumPy row shows that the measurement sees an N x N matrix when there is one
        ours = _peak_memory(65536, 64, "flash_attention(q, k, v, causal=True, return_lse=True)")
        control = _peak_memory(8192, 64, "naive_numpy(q, k, v, True)")
        lines += ["", "Peak RSS growth of one causal call beyond its inputs and outputs (fresh process):",
                  f"C twin, N = 65536, d = 64: {ours:.1f} MB (an N x N float32 matrix would be 16 GiB); "
                  f"naive NumPy, N = 8192, d = 64: {control:.0f} MB"]
    return lines


def _gpu_time(fn, repeats: int, busy_ms: float = 2.0) -> float:
    """Seconds a call of fn keeps the GPU busy: the median over `repeats` samples, each CUDA
    events around enough back-to-back calls to last about busy_ms. Calls are queued
    asynchronously, as in a model's forward, so a Python call's host time (ours ~0.1 ms,
    PyTorch's less) overlaps the kernel before it instead of counting as GPU idle time (an
    uncounted call runs ahead of the start event); the host time itself is the small-call
    figure of --extras."""
    import cupy as cp

    def sample(calls: int) -> float:
        start, end = cp.cuda.Event(), cp.cuda.Event()
        fn()             # queued first and not counted: the GPU is busy with it when start is
        start.record()   # recorded, so the first counted call's host time is hidden too
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / calls

    fn()
    cp.cuda.Device().synchronize()
    calls = max(1, min(100, int(busy_ms / max(sample(1), 1e-3))))
    return float(np.median([sample(calls) for _ in range(repeats)])) * 1e-3


def _naive_cupy(q, k, v, causal):
    import cupy as cp
    S = (q @ k.swapaxes(-1, -2)).astype(cp.float32) / np.sqrt(q.shape[-1])
    if causal:
        N = q.shape[-2]
        S = cp.where(cp.triu(cp.ones((N, N), dtype=bool), 1), -cp.inf, S)
    S = cp.exp(S - S.max(-1, keepdims=True))
    return (S / S.sum(-1, keepdims=True)).astype(q.dtype) @ v


def _sdpa_gpu(q, k, v, causal):
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        return {}
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    rivals = {}
    for name, backend in [("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]:
        def run(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(tq, tk, tv, is_causal=causal)
        try:
            run()
        except RuntimeError:
            continue   # that backend does not take this dtype or shape
        rivals[name] = run
    return rivals


# The rival each dtype's target is set against: PyTorch's fp32 attention is the "efficient"
# (xformers) kernel; for fp16/bf16 it is FlashAttention-2 ("flash").
TARGET_RIVAL = {"float32": "sdpa-efficient", "float16": "sdpa-flash", "bfloat16": "sdpa-flash"}
# Rows beyond the three dtypes: float32 through our other fp32 kernels (same inputs, same rivals).
FP32_ROWS: dict[str, dict[str, Any]] = {"float32-simt": dict(fp32_kernel="simt"), "tf32": dict(allow_tf32=True)}
GPU_ROWS = ("float32", "float32-simt", "tf32", "float16", "bfloat16")
NAIVE_MAX_N = 4096   # naive attention materializes B·H·N² scores: skip it beyond this


def bench_gpu(quick: bool, dtypes=GPU_ROWS) -> list[str]:
    import cupy as cp
    shapes = [(16, 16, 1024)] if quick else [(16, 16, 1024), (4, 16, 4096), (1, 16, 16384)]
    names = ["ours", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "naive-cupy"]
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    lines = [f"{name.decode() if isinstance(name, bytes) else name}: TFLOP/s (4·N²·d·B·H / t, halved for "
             f"causal; median of {3 if quick else 10} CUDA-event samples of ~2 ms of back-to-back calls; ours max err: "
             "max |O - float64| on 16 sampled rows of the first and last head). Target rival: sdpa-efficient for float32, "
             "sdpa-flash for float16/bfloat16.", "",
             "| dtype | d | B×H×N | causal | " + " | ".join(names)
             + " | ours / target | ours / best SDPA | ours max err | kernel |",
             "|" + " --- |" * (len(names) + 8)]
    rng = np.random.default_rng(0)
    done, total = 0, len(dtypes) * 2 * len(shapes) * 2
    for row in dtypes:
        options = FP32_ROWS.get(row, {})
        dtype = "float32" if options else row
        cast = _ml_bfloat16() if dtype == "bfloat16" else dtype
        for d in (64, 128):
            for B, H, N in shapes:
                for causal in (False, True):
                    q, k, v = (cp.asarray(rng.standard_normal((B, H, N, d), dtype=np.float32).astype(cast))
                               for _ in range(3))
                    fns = {"ours": lambda: flash_attention(q, k, v, causal=causal, **options)}
                    fns.update(_sdpa_gpu(q, k, v, causal))
                    if N <= NAIVE_MAX_N and _runs(naive := lambda: _naive_cupy(q, k, v, causal)):
                        fns["naive-cupy"] = naive
                    flops = 4 * N * N * d * B * H / (2 if causal else 1)
                    rate = {n: flops / _gpu_time(fn, 3 if quick else 10) / 1e12 for n, fn in fns.items()}
                    best_sdpa = max((rate[n] for n in names[1:4] if n in rate), default=None)
                    target = rate.get(TARGET_RIVAL[dtype])
                    cells = [f"{rate[n]:.2f}" if n in rate else "" for n in names]
                    ratios = [f"{rate['ours'] / r:.3f}" if r else "" for r in (target, best_sdpa)]
                    plan = plan_for(q, k, v, causal=causal, **options)
                    assert plan is not None
                    err = sampled_error(cp.asnumpy(fns["ours"]()), cp.asnumpy(q), cp.asnumpy(k), cp.asnumpy(v), causal)
                    lines.append(f"| {row} | {d} | {B}×{H}×{N} | {causal} | " + " | ".join(cells + ratios)
                                 + f" | {err:.1e} | `{plan.kernel}` |")
                    done += 1
                    print(f"[{done}/{total}] {lines[-1]}", file=sys.stderr, flush=True)
                    del q, k, v, fns
                    cp.get_default_memory_pool().free_all_blocks()
    return lines


def _runs(fn) -> bool:
    """Whether fn runs (CuPy's matmul does not take every dtype on every version)."""
    try:
        fn()
        return True
    except (TypeError, ValueError, NotImplementedError):
        return False


def _ml_bfloat16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashattn_cupy bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None,
                        help="which backend to measure (default cpu; gpu with --extras, --features, --decode "
                             "or --dtypes)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--no-memory", action="store_true", help="cpu: skip the N = 65536 peak-memory run")
    parser.add_argument("--dtypes", default=None,
                        help="gpu: comma-separated rows to measure: dtypes, 'float32-simt' (fp32 on the "
                             "CUDA cores), 'tf32' (float32 with allow_tf32=True); default all")
    parser.add_argument("--extras", action="store_true",
                        help="gpu: start-up, small-call and head-dim figures instead of the main table")
    parser.add_argument("--features", action="store_true",
                        help="gpu: sliding-window and variable-length rows instead of the main table")
    parser.add_argument("--decode", action="store_true",
                        help="gpu: split-KV decoding (few query rows, a long KV cache) against SDPA and a "
                             "device-to-device copy, instead of the main table")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to PATH as CSV")
    parser.add_argument("--json", metavar="PATH", help="also write the table to PATH as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also plot speed against N per (dtype, d) to PATH "
                        "(PNG; needs matplotlib)")
    args = parser.parse_args(argv)
    gpu_only = [flag for flag, given in (("--extras", args.extras), ("--features", args.features),
                                         ("--decode", args.decode), ("--dtypes", args.dtypes is not None))
                if given]
    if gpu_only and args.device == "cpu":
        parser.error(f"{', '.join(gpu_only)} measure{'s' if len(gpu_only) == 1 else ''} the GPU: drop --device cpu")
    args.device = args.device or ("gpu" if gpu_only else "cpu")
    if args.device == "cpu":
        lines = bench_cpu(args.quick, not args.no_memory)
    elif args.extras:
        from .bench_extras import bench_extras
        lines = bench_extras()
    elif args.features:
        from .bench_features import bench_features
        lines = bench_features()
    elif args.decode:
        from .bench_decode import bench_decode
        lines = bench_decode(3 if args.quick else 20)
    else:
        lines = bench_gpu(args.quick, tuple((args.dtypes or ",".join(GPU_ROWS)).split(",")))
    print("\n".join(lines))
    from . import bench_output
    if args.csv:
        bench_output.write_csv(lines, args.csv)
    if args.json:
        bench_output.write_json(lines, args.json)
    if args.plot:
        bench_output.plot(lines, args.plot)
    return 0
