"""CUDA source and compiled kernels.

The .cu files live in csrc/ and ship inside the package as `flashattn_cupy.csrc`; they are
read with importlib.resources. Local `#include "x.cuh"` lines are inlined here, so the
string NVRTC compiles (and our disk cache keys on) holds every line the kernel uses.
Each plan's kernel is one template instance, compiled by NVRTC (CuPy's binding) on its first use
on a device, stored on disk (kernel_cache: a later process loads it without NVRTC) and memoized
per (name expression, device).
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from importlib import resources

# No fast math (exact -inf masking, full-precision exp2f); denormals flushed, as CuPy compiles
# every kernel (-ftz=true) and as all our kernels were measured and tested.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=true")
SOURCES = {"flash_fwd_simt": "flash_fwd_simt.cu",   # kernel family -> file in csrc/
           "flash_fwd_fma": "flash_fwd_fma.cu",
           "flash_fwd_mma": "flash_fwd_mma.cu",
           "flash_fwd_wgmma": "flash_fwd_wgmma.cu",
           "flash_fwd_wgmma_f32_ws": "flash_fwd_wgmma_f32_ws.cu",
           "flash_decode": "flash_decode.cu",
           "flash_decode_combine": "flash_decode.cu"}
# Families built for an arch-specific target: wgmma exists on sm_90a alone (a cubin for sm_90a
# runs on compute capability 9.0 only, which is where the planner picks it).
ARCH_TARGETS = {"flash_fwd_wgmma": "sm_90a", "flash_fwd_wgmma_f32_ws": "sm_90a"}
MAX_DYNAMIC_SHARED_SIZE_BYTES = 8   # CUfunction_attribute's value in cuda.h (the driver's ABI)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*(//.*)?$', re.MULTILINE)   # a comment may follow


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
    return ARCH_TARGETS.get(family_name, arch)


def nvrtc_options(family_name: str, arch: str) -> tuple[str, ...]:
    """NVRTC's options for a family's kernels on a device of `arch` ("sm_80"): a cubin for it."""
    return NVRTC_OPTIONS + (f"-arch={target(family_name, arch)}",)


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
            kernel = _compile(cp, plan, device_id)
            if plan.smem_bytes > 48 * 1024:   # the default cap; more needs the opt-in
                cp.cuda.driver.funcSetAttribute(kernel.ptr, MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem_bytes)
        _kernels[key] = kernel   # the name fixes Br, Bc, D, hence smem_bytes
    return kernel


def _compile(cp, plan, device_id: int):
    """plan's kernel: read back from our file in the kernel cache directory, or compiled by NVRTC
    and stored there. A file that is missing, damaged (its SHA-256 fails) or refused by the driver
    is compiled again and replaced; a directory that refuses the file costs this process a
    compile per variant, with one KernelCacheWarning, never a result."""
    global _store_warned
    from . import _device, kernel_cache              # kernel_cache reads SOURCES from here
    name = family(plan.kernel)
    options = nvrtc_options(name, f"sm_{_device.compute_capability(device_id)}")
    text = source(SOURCES[name])
    # CuPy's version and the CUDA major/minor it runs on stand for NVRTC's (asking NVRTC would load it)
    path = kernel_cache.cache_dir() / kernel_cache.file_name(
        text, plan.kernel, *options, cp.__version__, str(cp.cuda.runtime.runtimeGetVersion()))
    stored = kernel_cache.read(path)
    if stored is not None:
        try:
            return _load(cp, *stored)
        except cp.cuda.driver.CUDADriverError:
            pass                                     # not a cubin this driver takes: compile again
    mangled, cubin = _nvrtc(cp, text, plan.kernel, options)
    kernel = _load(cp, mangled, cubin)
    failure = kernel_cache.write(path, kernel_cache.pack(mangled, cubin))
    if failure is not None and not _store_warned:
        _store_warned = True
        warnings.warn(f"flashattn_cupy could not store the compiled kernel {plan.kernel} in {path.parent} "
                      f"({type(failure).__name__}: {failure}); this process keeps its kernels in memory, so the "
                      f"next one compiles them again. To keep compiled kernels, make {path.parent} writable or "
                      "point CUPY_CACHE_DIR to a writable directory.", kernel_cache.KernelCacheWarning, stacklevel=3)
    return kernel


_store_warned = False


def _load(cp, mangled: str, cubin: bytes):
    module = cp.cuda.function.Module()
    module.load(cubin)
    return module.get_function(mangled)              # the Function keeps its module loaded


def _nvrtc(cp, text: str, name_expression: str, options: tuple[str, ...]) -> tuple[str, bytes]:
    """(mangled name, cubin) of one template instance, through CuPy's binding of NVRTC."""
    nvrtc = cp.cuda.nvrtc
    program = nvrtc.createProgram(text, family(name_expression) + ".cu", (), ())
    try:
        nvrtc.addNameExpression(program, name_expression)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC could not compile {name_expression} with {' '.join(options)} ({e}):\n"
                               f"{nvrtc.getProgramLog(program)}") from None
        return nvrtc.getLoweredName(program, name_expression), nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
