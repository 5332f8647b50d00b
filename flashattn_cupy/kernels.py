"""CUDA source and compiled kernels.

The .cu files live in csrc/ and ship inside the package as `flashattn_cupy.csrc`; they are
read with importlib.resources. Local `#include "x.cuh"` lines are inlined here, so the
string NVRTC compiles (and CuPy's disk cache keys on) holds every line the kernel uses.
Each plan's kernel is one template instance, compiled through `cupy.RawModule` with
`name_expressions` on first use and memoized per (name expression, device).
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources

NVRTC_OPTIONS = ("-std=c++17",)   # no fast math: exact -inf masking and full-precision exp2f
SOURCES = {"flash_fwd_simt": "flash_fwd_simt.cu",   # kernel family -> file in csrc/
           "flash_fwd_mma": "flash_fwd_mma.cu",
           "flash_fwd_wgmma": "flash_fwd_wgmma.cu",
           "flash_decode": "flash_decode.cu",
           "flash_decode_combine": "flash_decode.cu"}
# Families built for an arch-specific target: wgmma exists on sm_90a alone. CuPy appends its own
# -arch=sm_XX (the device's) after these options; given both, NVRTC builds for the "a" target.
ARCH_OPTIONS = {"flash_fwd_wgmma": ("-arch=sm_90a",)}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def source_file(filename: str):
    """The installed csrc file (a Traversable); raises FileNotFoundError if it is missing."""
    path = resources.files("flashattn_cupy.csrc").joinpath(filename)
    if not path.is_file():
        raise FileNotFoundError(f"{filename} is not in the installed flashattn_cupy.csrc package")
    return path


@functools.cache
def source(filename: str) -> str:
    """The file's text with local includes inlined (each header once; #pragma once)."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = source_file(name).read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


def family(name_expression: str) -> str:
    return name_expression.split("<", 1)[0]


def target(family_name: str, arch: str) -> str:
    """The NVRTC target ("sm_90", "sm_90a") a family's kernels are built for on a device of `arch`."""
    return next((o.split("=")[1] for o in ARCH_OPTIONS.get(family_name, ()) if o.startswith("-arch=")), arch)


_kernels: dict = {}


@dataclass(frozen=True)
class Variant:
    """A kernel to get() by name alone, as a Plan gives it (a decoding plan's combine kernel)."""

    kernel: str
    smem_bytes: int = 0


def get(plan, device_id: int):
    """The compiled kernel for `plan` on `device_id`, ready to launch with plan.smem_bytes."""
    key = (plan.kernel, device_id)
    kernel = _kernels.get(key)
    if kernel is None:
        from ._device import cupy
        cp = cupy()
        with cp.cuda.Device(device_id):
            kernel = _compile(cp, plan)
            if plan.smem_bytes > 48 * 1024:   # the default cap; more needs the opt-in
                kernel.max_dynamic_shared_size_bytes = plan.smem_bytes
        _kernels[key] = kernel   # the name fixes Br, Bc, D, hence smem_bytes
    return kernel


def _compile(cp, plan):
    """plan's kernel, through CuPy's kernel cache. CuPy checks each cache file against the SHA-1
    stored in it and compiles again over a truncated or garbled one; it raises on a directory it
    cannot write (read-only; before 14.2 also one it cannot create), a file it cannot read, and
    a file whose hash holds but whose cubin the driver refuses. Then this process compiles in
    memory from now on (CUPY_CACHE_IN_MEMORY=1, read by CuPy at each compile, its own kernels'
    too), with a KernelCacheWarning; an error that compiling in memory meets as well is raised."""
    def compile_once():
        name = family(plan.kernel)
        module = cp.RawModule(code=source(SOURCES[name]), options=NVRTC_OPTIONS + ARCH_OPTIONS.get(name, ()),
                              name_expressions=(plan.kernel,))
        return module.get_function(plan.kernel)

    try:
        return compile_once()
    except (OSError, cp.cuda.driver.CUDADriverError) as e:
        if os.environ.get("CUPY_CACHE_IN_MEMORY") == "1":
            raise
        failure = e
    previous = os.environ.get("CUPY_CACHE_IN_MEMORY")
    os.environ["CUPY_CACHE_IN_MEMORY"] = "1"
    try:
        kernel = compile_once()
    except BaseException:                            # the cache was not the trouble
        if previous is None:
            del os.environ["CUPY_CACHE_IN_MEMORY"]
        else:
            os.environ["CUPY_CACHE_IN_MEMORY"] = previous
        raise
    from .kernel_cache import KernelCacheWarning, cache_dir
    path = cache_dir()
    warnings.warn(f"CuPy's kernel cache {path} could not be used for {plan.kernel} ({type(failure).__name__}: "
                  f"{failure}); compiled it in memory instead, as this process now does for every kernel "
                  "(CUPY_CACHE_IN_MEMORY=1), so each new process compiles again. To keep compiled kernels, make "
                  f"{path} writable or point CUPY_CACHE_DIR to a writable directory; remove a damaged file with "
                  "`python -m flashattn_cupy clear-cache` (--all if the file no longer holds a kernel name).",
                  KernelCacheWarning, stacklevel=2)
    return kernel
