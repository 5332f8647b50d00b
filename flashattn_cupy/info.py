"""`python -m flashattn_cupy info`: what this installation can run, and what it would run.

Versions, each backend and why it is unavailable, the GPUs (compute capability, shared memory
per block), NVRTC and CuPy, CuPy's kernel cache and our variants in it, and the planner's choice for a sample shape:
on this machine's GPU, or, with none, on reference devices (the seed's 48 KB Turing, an A100,
an H100). Nothing here compiles or launches a kernel.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

from . import __version__, _device, kernel_cache, planner

KB = 1024
# (label, opt-in shared memory per block, compute capability) planned for when there is no GPU
REFERENCE_DEVICES = (("sm_75, 48 KB (the seed's budget)", 48 * KB, 75),
                     ("sm_80, 163 KB (A100)", 163 * KB, 80),
                     ("sm_90, 227 KB (H100)", 227 * KB, 90))


def backends() -> dict[str, str]:
    """Each backend and '' when it can run here, else why it cannot."""
    from . import _c_backend
    try:
        _c_backend.require()
        c_why = ""
    except _device.BackendUnavailableError as exc:
        c_why = str(exc)
    return {"c": c_why, "cuda": _device.gpu_unavailable_reason(), "reference": ""}


def _gpu_lines(cp) -> list[str]:
    lines = [f"CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, "
             f"driver {cp.cuda.runtime.driverGetVersion()}, NVRTC {'.'.join(map(str, cp.cuda.nvrtc.getVersion()))}"]
    for device_id in range(cp.cuda.runtime.getDeviceCount()):
        lines.append(f"GPU {device_id}: {_device.describe(device_id)}, shared memory per block "
                     f"{_device.smem_limit(device_id) / KB:.0f} KB (opt-in)")
    return lines


def report(N: int = 4096, d: int = 64, dtype: str = "float16", causal: bool = False) -> str:
    """The text `python -m flashattn_cupy info` prints."""
    lines = [f"flashattn_cupy {__version__} ({Path(__file__).parent})",
             f"Python {platform.python_version()}, NumPy {np.__version__}, {platform.machine()}", "",
             "Backends:"]
    available = backends()
    lines += [f"  {name}: {'available' if not why else 'unavailable: ' + why}" for name, why in available.items()]
    lines.append("")
    if not available["cuda"]:
        lines += _gpu_lines(_device.cupy())
    lines += kernel_cache.report_lines()
    lines += ["", f"Plans for Nq = Nk = {N}, d = {d}, causal = {causal}:"]
    if not available["c"]:
        c_dtype = dtype if dtype in planner.C_TYPES else "float32"
        lines.append(f"  C twin ({c_dtype}): {planner.plan(N, N, d, dtype=c_dtype, causal=causal, backend='c')}")
    if dtype not in planner.CUDA_TYPES:
        lines.append(f"  CUDA: takes {', '.join(planner.CUDA_TYPES)}, not {dtype}")
    elif not available["cuda"]:
        device_id = _device.current_device()
        lines.append(f"  CUDA ({dtype}) on GPU {device_id}: "
                     f"{planner.plan(N, N, d, dtype=dtype, causal=causal, backend='cuda')}")
    else:
        for label, smem_limit, arch in REFERENCE_DEVICES:
            p = planner.plan(N, N, d, dtype=dtype, causal=causal, smem_limit=smem_limit, arch=arch)
            lines.append(f"  CUDA ({dtype}) planned for {label}: {p}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashattn_cupy info", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="sequence length of the sample plan (default 4096)")
    parser.add_argument("--d", type=int, default=64, help="head dimension of the sample plan (default 64)")
    parser.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float16",
                        help="dtype of the sample plan (default float16; the C twin plans float32 instead "
                             "of a dtype it does not take)")
    parser.add_argument("--causal", action="store_true", help="plan the causal variant")
    args = parser.parse_args(argv)
    if args.n < 1 or not 1 <= args.d <= planner.MAX_HEAD_DIM:
        parser.error(f"--n must be >= 1 and --d in 1..{planner.MAX_HEAD_DIM}")
    print(report(args.n, args.d, args.dtype, args.causal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
