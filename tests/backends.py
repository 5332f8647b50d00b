"""One call on the C twin or on CUDA from NumPy inputs, for tests that hold for every backend and
every kernel the planner may pick (they go through flash_attention and plan_for only)."""
import ml_dtypes
import numpy as np
import pytest

from flashattn_cupy import _device, flash_attention, plan_for
from tolerances import kernel_rounding

# The ways float32 runs on CUDA, as flash_attention's options: the default (3xTF32 tensor cores
# on sm_80 and later, CUDA cores before), the CUDA-core kernel, TF32
FP32_OPTIONS = {"cuda": {}, "cuda-simt": {"fp32_kernel": "simt"}, "cuda-tf32": {"allow_tf32": True}}

# (backend, dtype): every dtype each backend takes, and every float32 kernel; CUDA marked gpu
BACKEND_DTYPES = [
    pytest.param("c", "float32", id="c-float32"),
    pytest.param("c", "float64", id="c-float64"),
    *(pytest.param(b, t, id=f"{b}-{t}", marks=pytest.mark.gpu)
      for b, t in [("cuda", "float32"), ("cuda-simt", "float32"), ("cuda-tf32", "float32"),
                   ("cuda", "float16"), ("cuda", "bfloat16")]),
]


def np_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def run(backend, q, k, v, **kw):
    """(O, L, rounding): flash_attention's outputs as NumPy arrays, and the bounds() keywords
    (tolerances.py) for the kernel that ran. "cuda..." runs on CuPy copies of q, k, v (or on
    q, k, v themselves if they are CuPy arrays), with that key's FP32_OPTIONS."""
    if backend == "c":
        O, L = flash_attention(q, k, v, backend="c", return_lse=True, **kw)
        return O, L, {"compute": "float64" if q.dtype == np.float64 else "float32"}
    cp = _device.cupy()
    args = [cp.asarray(x) for x in (q, k, v)]
    kw = {**kw, **FP32_OPTIONS[backend]}
    O, L = flash_attention(*args, return_lse=True, **kw)
    return cp.asnumpy(O), cp.asnumpy(L), kernel_rounding(plan_for(*args, **kw))
