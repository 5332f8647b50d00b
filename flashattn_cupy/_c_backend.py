"""The C twin (csrc/flash_fwd.c), called through the cffi extension built at install time.
cffi releases the GIL for the call, so Python threads may run heads in parallel."""
from __future__ import annotations

import numpy as np

from ._device import BackendUnavailableError

try:
    from ._flash_c import ffi, lib
except ImportError as exc:   # a source checkout that was never built
    ffi = lib = None
    _why = exc

_CTYPE = {"float32": "float", "float64": "double"}


def require() -> None:
    if lib is None:
        raise BackendUnavailableError(
            f"the C backend's extension flashattn_cupy._flash_c is not built ({_why}); "
            "install the package with pip install -e . (or pip install .)")


def run(problem, plan, q, k, v):
    """(O, L) as NumPy arrays from NumPy q, k, v; O has q's shape and dtype, L float32."""
    require()
    shape = q.shape
    q, k, v = (np.ascontiguousarray(x).reshape(-1, x.shape[-2], problem.d) for x in (q, k, v))
    O = np.empty(q.shape, dtype=q.dtype)
    L = np.empty(q.shape[:-1], dtype=np.float32)
    ctype = _CTYPE[problem.dtype]
    buf = lambda x, t=ctype: ffi.from_buffer(f"{t}[]", x)  # noqa: E731
    status = getattr(lib, plan.kernel)(
        buf(q), buf(k), buf(v), buf(O), buf(L, "float"),
        q.shape[0], problem.Nq, problem.Nk, problem.d, plan.Br, plan.Bc,
        problem.scale, int(problem.causal))
    if status == lib.FLASH_ENOMEM:
        raise MemoryError(f"the C backend could not allocate its tiles ({plan})")
    if status != lib.FLASH_OK:
        raise RuntimeError(f"the C backend rejected its arguments (status {status}); this is a bug")
    return O.reshape(shape), L.reshape(shape[:-1])
