"""CUDA source and compiled kernels.

The .cu files live in csrc/ and ship inside the package as `flashattn_cupy.csrc`; they are
read with importlib.resources. Local `#include "x.cuh"` lines are inlined here, so the
string NVRTC compiles (and CuPy's disk cache keys on) holds every line the kernel uses.
Each plan's kernel is one template instance, compiled through `cupy.RawModule` with
`name_expressions` on first use and memoized per (name expression, device).
"""
from __future__ import annotations

import functools
import re
from importlib import resources

NVRTC_OPTIONS = ("-std=c++17",)   # no fast math: exact -inf masking and full-precision exp2f
SOURCES = {"flash_fwd_simt": "flash_fwd_simt.cu",   # kernel family -> file in csrc/
           "flash_fwd_mma": "flash_fwd_mma.cu"}
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


_kernels: dict = {}


def get(plan, device_id: int):
    """The compiled kernel for `plan` on `device_id`, ready to launch with plan.smem_bytes."""
    key = (plan.kernel, device_id)
    kernel = _kernels.get(key)
    if kernel is None:
        from ._device import cupy
        cp = cupy()
        with cp.cuda.Device(device_id):
            module = cp.RawModule(code=source(SOURCES[family(plan.kernel)]),
                                  options=NVRTC_OPTIONS, name_expressions=(plan.kernel,))
            kernel = module.get_function(plan.kernel)
            if plan.smem_bytes > 48 * 1024:   # the default cap; more needs the opt-in
                kernel.max_dynamic_shared_size_bytes = plan.smem_bytes
        _kernels[key] = kernel   # the name fixes Br, Bc, D, hence smem_bytes
    return kernel
