"""The C twin (csrc/flash_fwd.c), called through the cffi extension built at install time.
cffi releases the GIL for the call, so Python threads may run heads in parallel."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
    """(O, L) as NumPy arrays from NumPy q, k, v; O has q's shape and dtype, L float32.
    The batch * heads problems are cut into plan.threads contiguous slices, one C call each
    (two where a slice starts inside a group of q heads sharing k and v), on that many threads;
    every head is computed the same way whatever the slicing. k and v are not repeated for GQA:
    the C twin reads one k/v head for each `group` consecutive q heads. The problem's window,
    softcap and ALiBi slopes (one per q head, sliced with it) go to C as its flash_mods."""
    require()
    shape = q.shape
    # C-contiguous and aligned: the C twin reads them through float / double pointers
    q, k, v = (np.require(x, requirements=("C", "A")).reshape(-1, x.shape[-2], problem.d) for x in (q, k, v))
    O = np.empty(q.shape, dtype=q.dtype)
    L = np.empty(q.shape[:-1], dtype=np.float32)
    kernel, ctype, G = getattr(lib, plan.kernel), _CTYPE[problem.dtype], problem.group
    buf = lambda x, t=ctype: ffi.from_buffer(f"{t}[]", x)  # noqa: E731
    (left, right), softcap, alibi = problem.window, problem.softcap, problem.alibi
    slopes = None if alibi is None else np.require(alibi, np.float32, ("C", "A")).reshape(-1)

    def call(lo, hi):   # q heads lo..hi-1, from k/v head lo // G on: lo starts its group, or hi ends it
        alibi_lo = ffi.NULL if slopes is None else buf(slopes[lo:hi], "float")   # held through the call
        mods = ffi.new("flash_mods *", {"left": left, "right": right, "softcap": softcap, "alibi": alibi_lo})
        return kernel(buf(q[lo:hi]), buf(k[lo // G:]), buf(v[lo // G:]), buf(O[lo:hi]), buf(L[lo:hi], "float"),
                      hi - lo, G, problem.Nq, problem.Nk, problem.d, plan.Br, plan.Bc, problem.scale, mods)

    def heads(lo, hi):   # q heads lo..hi-1: the rest of lo's group, then whole groups
        cut = min(hi, -(-lo // G) * G)
        return [call(a, b) for a, b in ((lo, cut), (cut, hi)) if a < b]

    BH, threads = q.shape[0], plan.threads
    bounds = [BH * t // threads for t in range(threads + 1)]   # sizes differ by at most one
    # The calling thread takes the first slice itself. Handing every slice to new workers
    # measured slower on a 2-core VM: the scheduler often put both workers on one core.
    with ThreadPoolExecutor(max(threads - 1, 1)) as pool:   # no thread starts for threads = 1
        rest = [pool.submit(heads, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
        statuses = heads(bounds[0], bounds[1]) + [s for future in rest for s in future.result()]
    if lib.FLASH_ENOMEM in statuses:
        raise MemoryError(f"the C backend could not allocate its tiles ({plan})")
    if any(status != lib.FLASH_OK for status in statuses):
        raise RuntimeError(f"the C backend rejected its arguments (statuses {statuses}); this is a bug")
    return O.reshape(shape), L.reshape(shape[:-1])
