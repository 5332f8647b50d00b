"""The CUDA-core kernels (csrc/flash_fwd_simt.cu, csrc/flash_fwd_fma.cu) run on the CPU: the very
text NVRTC compiles (kernels.source), compiled by the host's C++ compiler against
emulator/cuda_on_cpu.h (a block's threads as fibers, barriers and shuffles as the hardware
defines them) and launched with the arguments _cuda_backend passes. Where kernel_model.py checks
the launch plumbing against a model of the kernels, this runs their own code: tiles, masks,
online softmax, shuffles and the shared-memory layout, on a machine without a GPU.

`use(monkeypatch)` makes _cuda_backend run on NumPy arrays (as kernel_model.use) with
kernels.get returning the emulated kernel; `attention(q, k, v, arch=..., **options)` plans a call
as api does for a device of that compute capability and runs it.
"""
import atexit
import os
import shutil
import subprocess
import tempfile

import numpy as np
from cffi import FFI

import kernel_model
from flashattn_cupy import _cuda_backend, _device, kernels, planner
from flashattn_cupy._validate import validate

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulator")
# the kernels without tensor-core PTX (fa_async.cuh's copies have an emulated branch; fa_dtypes'
# fp16 cvt is never reached: fp16 runs on the tensor cores)
FAMILIES = ("flash_fwd_simt", "flash_fwd_fma")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

_ffi = FFI()
_ffi.cdef("int fa_emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned threads, size_t smem, void** args);")
_built = {}   # name expression -> loaded library
_dir = []
launched = []   # the name expression of every emulated launch, in order


def unavailable_reason():
    return None if CXX else "no C++ compiler (g++ or c++) on PATH"


def build(name_expression: str):
    """The library that launches one template instance on the CPU (compiled once a process)."""
    lib = _built.get(name_expression)
    if lib is None:
        family = kernels.family(name_expression)
        assert family in FAMILIES, f"{family} uses inline PTX; it runs on a GPU only"
        if not _dir:
            _dir.append(tempfile.mkdtemp(prefix="fa_emu_"))
            atexit.register(shutil.rmtree, _dir[0], ignore_errors=True)   # a loaded library needs no file
        stem = os.path.join(_dir[0], f"k{len(_built)}")
        with open(stem + ".cpp", "w") as f:
            f.write('#include "cuda_on_cpu.h"\n')
            f.write(kernels.source(kernels.SOURCES[family]))
            f.write('\nextern "C" int fa_emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned threads,'
                    ' size_t smem, void** args) {\n'
                    f'    return emu::launch_kernel(&{name_expression}, dim3{{gx, gy, gz}}, threads, smem, args);\n}}\n')
        # -O1: the kernels' unrolled loops compile in seconds; the fp32 arithmetic is IEEE either way
        built = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-I", HERE, "-o", stem + ".so",
                                stem + ".cpp"], capture_output=True, text=True)
        assert built.returncode == 0, f"{name_expression} does not build on the CPU:\n{built.stderr[-4000:]}"
        lib = _built[name_expression] = _ffi.dlopen(stem + ".so")
    return lib


def _address(x) -> int:
    return x.__array_interface__["data"][0]


def kernel(plan):
    """kernels.get's stand-in: plan's kernel, called as CuPy's RawKernel is."""
    lib = build(plan.kernel)

    def launch(grid, block, args, shared_mem=0):
        assert shared_mem == plan.smem_bytes and block == (plan.threads,)
        launched.append(plan.kernel)
        # each argument's bytes, as cuLaunchKernel reads them: a pointer for an array, else the scalar
        slots = [np.array([_address(a)], np.uint64) if isinstance(a, np.ndarray)
                 else np.array([kernel_model._number(a)]) for a in args]
        for s, a in zip(slots, args):
            assert s.dtype in (np.uint64, np.int64, np.int32, np.float32), (a, s.dtype)
        pointers = _ffi.new("void*[]", [_ffi.cast("void*", _address(s)) for s in slots])
        gx, gy, gz = (*grid, 1, 1)[:3]
        status = lib.fa_emu_launch(gx, gy, gz, block[0], shared_mem, pointers)
        assert status != -1, f"{plan.kernel}: {block[0]} threads or {shared_mem} bytes of shared memory out of range"
        assert status != -2, f"{plan.kernel} deadlocked: its threads wait at barriers the others never reach"
        assert status == 0
    return launch


def use(monkeypatch):
    kernel_model.use(monkeypatch, [])
    shim = _cuda_backend.cupy()   # NumPy in CuPy's place, for validation too
    monkeypatch.setattr(_device, "cupy", lambda: shim)
    monkeypatch.setattr(_device, "current_device", lambda: 0)
    monkeypatch.setattr(kernels, "get", lambda plan, device_id: kernel(plan))


def attention(q, k, v, *, arch, smem_limit, fp32_kernel="simt", causal=False, **options):
    """(O, L, plan) of a call with NumPy q, k, v planned as api plans it for a device of compute
    capability `arch` and that shared-memory limit, run by the emulated kernel."""
    if q.dtype != np.float32:
        fp32_kernel = "auto"   # the option is float32's
    problem = validate(q, k, v, causal=causal, softmax_scale=options.pop("softmax_scale", None), return_lse=True,
                       backend="cuda", fp32_kernel=fp32_kernel, **options)
    plan = planner.plan(problem.Nq, problem.Nk, problem.d, dtype=problem.dtype, causal=problem.causal,
                        batch=problem.batch, heads=problem.heads, smem_limit=smem_limit,
                        arch=arch, fp32=problem.fp32, group=problem.group, sm_count=132, decode=False,
                        **_cuda_backend.mask_options(problem))
    O, L = _cuda_backend.run(problem, plan, 0)
    return O, L, plan
