"""One call on the C twin or on CUDA from NumPy inputs, for tests that hold for every backend and
every kernel the planner may pick (they go through flash_attention and plan_for only)."""
import ml_dtypes
import numpy as np
import pytest

from flashattn_cupy import _device, flash_attention, plan_for
from tolerances import kernel_rounding

# (backend, dtype): every dtype each backend takes; the CUDA ones are marked gpu
BACKEND_DTYPES = [
    pytest.param("c", "float32", id="c-float32"),
    pytest.param("c", "float64", id="c-float64"),
    *(pytest.param("cuda", t, id=f"cuda-{t}", marks=pytest.mark.gpu)
      for t in ("float32", "float16", "bfloat16")),
]


def np_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def run(backend, q, k, v, **kw):
    """(O, L, rounding): flash_attention's outputs as NumPy arrays, and the bounds() keywords
    (tolerances.py) for the kernel that ran. "cuda" runs on CuPy copies of q, k, v."""
    if backend == "c":
        O, L = flash_attention(q, k, v, backend="c", return_lse=True, **kw)
        return O, L, {"compute": "float64" if q.dtype == np.float64 else "float32"}
    cp = _device.cupy()
    args = [cp.asarray(x) for x in (q, k, v)]
    O, L = flash_attention(*args, return_lse=True, **kw)
    return cp.asnumpy(O), cp.asnumpy(L), kernel_rounding(plan_for(*args, **kw))
