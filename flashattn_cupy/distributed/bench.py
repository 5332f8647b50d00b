"""Ring attention's scaling over GPUs: `python -m flashattn_cupy.distributed.bench`.

For each number of GPUs in --gpus (at most this host's), the ranks are started by the launcher:
- weak scaling: the tokens per GPU fixed (--tokens-per-gpu), the sequence world times as long;
- strong scaling: the sequence fixed (--tokens), world times fewer tokens per GPU.
Each row: the ring's time per call (the slowest rank's; the median of --repeats), TFLOP/s per GPU
on the work the mask leaves (4·d per visible (query, key) pair per head, divided over the GPUs),
the same ring with its transfers left out (each rank's kernels and merges alone: the per-GPU work
on one GPU), and the share of the ring's time spent waiting on communication, 1 − kernels alone
/ ring (0 when the transfers hide behind the kernels; noise can make it slightly negative).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from .. import _device
from ..bench import _ml_bfloat16
from ..bench_output import write_csv
from .launch import launch


class _KernelsOnly:
    """A group whose transfers move nothing: the ring's kernels and merges alone. The receive
    buffers keep whatever memory they were given, which the kernels' speed does not depend on."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def exchange(self, arrays: tuple) -> tuple:
        return arrays

    def start(self, send, recv):
        return None

    def wait(self, transfer) -> None:
        pass

    def agree(self, value: int) -> bool:
        return True


def _tokens(args, world: int) -> int:
    return args.tokens_per_gpu * world if args.scaling == "weak" else args.tokens


def _seconds(fn, repeats: int, group) -> float:
    """fn's wall time per call, the ranks starting together; the slowest rank's, median."""
    cp = _device.cupy()
    fn()                                              # compiles, and fills the memory pool
    times = []
    for _ in range(repeats):
        cp.cuda.Device().synchronize()
        group.agree(0)                                # every rank is here
        start = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    slowest = cp.asarray(times)
    group.backend.all_reduce(slowest, slowest, op="max")
    return float(np.median(cp.asnumpy(slowest)))


def _worker(args) -> int:
    """One rank (under the launcher): measure, and rank 0 writes the row to args.out as JSON."""
    from .nccl import init_from_env
    from .ring import ring_attention
    group = init_from_env()
    cp = _device.cupy()
    world, rank = group.world_size, group.rank
    N = _tokens(args, world)
    rng = cp.random.default_rng(rank)
    dtype = _ml_bfloat16() if args.dtype == "bfloat16" else args.dtype
    q, k, v = (rng.standard_normal((1, args.heads, N // world, args.d), dtype=cp.float32).astype(dtype)
               for _ in range(3))
    kw = dict(causal=args.causal, layout=args.layout)
    ring = _seconds(lambda: ring_attention(q, k, v, group=group, **kw), args.repeats, group)
    alone = _seconds(lambda: ring_attention(q, k, v, group=_KernelsOnly(rank, world), **kw), args.repeats, group)
    pairs = N * (N + 1) // 2 if args.causal else N * N
    per_gpu = 4 * args.d * args.heads * pairs / world / 1e12
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"scaling": args.scaling, "gpus": world, "tokens": N, "tokens_per_gpu": N // world,
                       "ring_ms": ring * 1e3, "tflops": per_gpu / ring, "alone_ms": alone * 1e3,
                       "tflops_alone": per_gpu / alone, "waiting": 1 - alone / ring}, f)
    return 0


def _table(args, rows: list[dict]) -> list[str]:
    cp = _device.cupy()
    from cupy.cuda import nccl
    version = nccl.get_version()
    lines = [f"Ring attention over NCCL {version // 10000}.{version // 100 % 100}.{version % 100}, CuPy "
             f"{cp.__version__}, {_device.describe(0)}: {args.dtype}, d = {args.d}, {args.heads} heads, "
             f"{'causal' if args.causal else 'no mask'}, layout {args.layout}; median of {args.repeats}", "",
             "| scaling | GPUs | tokens | tokens per GPU | ring ms | TFLOP/s per GPU | kernels alone ms | "
             "TFLOP/s per GPU, kernels alone | waiting on communication |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['scaling']} | {r['gpus']} | {r['tokens']} | {r['tokens_per_gpu']} | {r['ring_ms']:.2f} | "
              f"{r['tflops']:.1f} | {r['alone_ms']:.2f} | {r['tflops_alone']:.1f} | {100 * r['waiting']:.1f}% |"
              for r in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashattn_cupy.distributed.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4,8", help="numbers of GPUs to run on, comma-separated "
                        "(default 1,2,4,8; those above this host's count are left out)")
    parser.add_argument("--scaling", choices=("weak", "strong", "both"), default="both")
    parser.add_argument("--tokens-per-gpu", type=int, default=32768, help="weak scaling (default 32768)")
    parser.add_argument("--tokens", type=int, default=131072, help="strong scaling: the sequence (default 131072)")
    parser.add_argument("--heads", type=int, default=8, help="heads, batch 1 (default 8)")
    parser.add_argument("--d", type=int, default=128, help="head dim (default 128)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="no mask (default causal)")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to PATH as CSV")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # one rank, under the launcher
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    try:
        gpus = sorted({int(g) for g in args.gpus.split(",")})
    except ValueError:
        parser.error(f"--gpus takes comma-separated numbers, got {args.gpus!r}")
    per = 2 if args.layout == "zigzag" else 1
    if min(gpus) < 1:
        parser.error(f"--gpus must be at least 1, got {args.gpus!r}")
    if args.scaling != "strong" and args.tokens_per_gpu % per:
        parser.error(f"--tokens-per-gpu must be a multiple of {per} with layout {args.layout}")
    uneven = [g for g in gpus if args.tokens % (g * per)]
    if args.scaling != "weak" and uneven:
        parser.error(f"--tokens {args.tokens} does not cut into {per} x GPUs equal chunks for GPUs {uneven}")
    count = _device.cupy().cuda.runtime.getDeviceCount()
    if any(g > count for g in gpus):
        print(f"this host has {count} GPUs: leaving out {[g for g in gpus if g > count]}", file=sys.stderr)
    rows = []
    for scaling in ("weak", "strong") if args.scaling == "both" else (args.scaling,):
        for g in (g for g in gpus if g <= count):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "row.json")
                command = ["-m", "flashattn_cupy.distributed.bench", "--worker", "--out", out, "--scaling", scaling,
                           "--tokens-per-gpu", str(args.tokens_per_gpu), "--tokens", str(args.tokens),
                           "--heads", str(args.heads), "--d", str(args.d), "--dtype", args.dtype,
                           "--layout", args.layout, "--repeats", str(args.repeats)]
                command += [] if args.causal else ["--no-causal"]
                status = launch(command, g)
                if status:
                    print(f"the run on {g} GPUs failed (status {status})", file=sys.stderr)
                    return status
                with open(out) as f:
                    rows.append(json.load(f))
    lines = _table(args, rows)
    print("\n".join(lines))
    if args.csv:
        write_csv(lines, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
