"""GPU benchmark: flashattn_cupy against PyTorch SDPA (each backend it has) and naive CuPy,
measured in the same process on the same inputs. TFLOP/s = 4 N^2 d B H / t, halved for causal.

    python benchmarks/bench_gpu.py [--quick] [--csv results.csv]

Prints a Markdown table (BENCHMARKS.md keeps the latest one). torch is only a rival here: it is
imported by this script, never by the package; rows for missing rivals are left blank.
"""
from __future__ import annotations

import argparse
import csv
import sys

import cupy as cp
import numpy as np

from flashattn_cupy import flash_attention, plan_for

SHAPES = [(16, 16, 1024), (4, 16, 4096)]   # (B, H, N): enough blocks to fill an H100


def _time(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs, timed with CUDA events after a warm-up."""
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def _naive(q, k, v, causal):
    S = (q @ k.swapaxes(-1, -2)).astype(cp.float32) / np.sqrt(q.shape[-1])
    if causal:
        N = q.shape[-2]
        S = cp.where(cp.triu(cp.ones((N, N), dtype=bool), 1), -cp.inf, S)
    S = cp.exp(S - S.max(-1, keepdims=True))
    return ((S / S.sum(-1, keepdims=True)).astype(q.dtype) @ v)


def _torch_rivals(q, k, v, causal):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 10
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float16"):
        for d in (64, 128):
            for B, H, N in shapes:
                for causal in (False, True):
                    q, k, v = (cp.asarray(rng.standard_normal((B, H, N, d), dtype=np.float32)).astype(dtype)
                               for _ in range(3))
                    flops = 4 * N * N * d * B * H / (2 if causal else 1)
                    plan = plan_for(q, k, v, causal=causal)
                    times = {"ours": _time(lambda: flash_attention(q, k, v, causal=causal), repeats)}
                    for name, fn in _torch_rivals(q, k, v, causal).items():
                        times[name] = _time(fn, repeats)
                    times["naive-cupy"] = _time(lambda: _naive(q, k, v, causal), repeats)
                    row = dict(dtype=dtype, d=d, B=B, H=H, N=N, causal=causal, kernel=plan.kernel)
                    row.update({f"{n}_TFLOPs": flops / (t * 1e-3) / 1e12 for n, t in times.items()})
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
    names = ["ours", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "naive-cupy"]
    print(f"Device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}; TFLOP/s "
          "(4·N²·d·B·H / t, halved for causal; median of CUDA-event timings)\n")
    print("| dtype | d | B×H×N | causal | " + " | ".join(names) + " | ours / best SDPA |")
    print("|" + " --- |" * (len(names) + 5))
    for r in rows:
        vals = [r.get(f"{n}_TFLOPs") for n in names]
        sdpa_best = max((x for x in vals[1:4] if x), default=None)
        cells = [f"{x:.2f}" if x else "" for x in vals]
        ratio = f"{vals[0] / sdpa_best:.3f}" if sdpa_best else ""
        print(f"| {r['dtype']} | {r['d']} | {r['B']}×{r['H']}×{r['N']} | {r['causal']} | "
              + " | ".join(cells) + f" | {ratio} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({key for r in rows for key in r}))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
