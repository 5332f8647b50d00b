"""The CUDA path: strides and sizes from CuPy arrays, a call's launches on the current stream
(a Call, which api keeps for repeated calls). Nothing here synchronizes the host; the kernels
come from kernels.get (compiled once)."""
from __future__ import annotations

import math
import sys
import threading

import numpy as np

from . import kernels
from ._device import cupy
from ._validate import window_pair


def _unit_stride(x, cp):
    """x, or a contiguous copy of it when its last dim is not contiguous (the kernels need that)."""
    return cp.ascontiguousarray(x) if x.shape[-1] > 1 and x.strides[-1] != x.itemsize else x


_PACKED: dict = {}     # (int32s, int64s, float32s) -> the kernel arguments
_VALUE: list = []      # the Value class below, made once CuPy is imported


def _value_type():
    """A class of launch arguments CuPy passes on untouched, or None (no CuPy imported yet, or
    one without its base). CuPy turns each NumPy scalar argument into a C value again at every
    launch (~0.7 µs each, and a launch has 20 to 30); an instance of its CPointer
    (cupy/cuda/function.pyx, a pass-through since 2018) is taken as it is, its .ptr the address
    of the value's bytes."""
    if not _VALUE and "cupy" in sys.modules:
        try:
            from cupy.cuda.function import CPointer
        except ImportError:
            return None

        class Value(CPointer):
            """A scalar argument: .ptr addresses its bytes in `block` (kept alive here); .value
            is the number, as a NumPy scalar of the kernel parameter's type."""

            def __init__(self, value, block, address):
                super().__init__(address)
                self.value, self.block = value, block

            def __repr__(self):
                return f"Value({self.value!r})"

        _VALUE.append(Value)
    return _VALUE[0] if _VALUE else None


def _values(scalars: tuple) -> tuple:
    """NumPy scalars as launch arguments: Values over one buffer (8 bytes a slot, each value at
    the start of its own: the driver copies each parameter's size from its address), or the
    scalars themselves without CuPy's CPointer."""
    Value = _value_type()
    if Value is None:
        return scalars
    block = np.frombuffer(bytearray(b"".join(x.tobytes().ljust(8, b"\0") for x in scalars)), np.uint8)
    base = block.ctypes.data   # read once: each .ctypes builds an object (~2 µs; a launch has 20 to 30)
    return tuple(Value(x, block, base + 8 * i) for i, x in enumerate(scalars))


def null():
    """A null pointer argument (the kernels test for it): 8 zero bytes."""
    return packed((), (0,))[0]


def packed(i32s: tuple, i64s: tuple, f32s: tuple = ()) -> tuple:
    """A launch's scalar arguments typed as the kernels declare them (int, long long, float),
    made once per distinct tuple (the same ones call after call in a model's loop), as CuPy
    takes them fastest (_values)."""
    key = (i32s, i64s, f32s, tuple(math.copysign(1.0, f) for f in f32s))   # -0.0 == 0.0, but not as an argument
    found = _PACKED.get(key)
    if found is None:
        if len(_PACKED) >= 4096:   # a bound, for programs whose shapes never repeat
            _PACKED.clear()        # (the Values of a dropped entry keep their own buffer alive)
        found = _PACKED[key] = _values((*map(np.int32, i32s), *map(np.int64, i64s), *map(np.float32, f32s)))
    return found


def _batch_stride(shape: tuple, strides: tuple):
    """The element stride sb with the batch dims (every leading dim but the last) at sb * b for
    their flattened index b, of an array of this shape and element strides; None when they do
    not collapse into one stride."""
    if len(shape) <= 4:   # the usual (B, H, N, d), (H, N, d), (N, d): at most one batch dim, no walk
        return strides[0] if len(shape) == 4 and shape[0] != 1 else 0
    bdims = [(n, s) for n, s in zip(shape[:-3], strides[:-3]) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(bdims, bdims[1:])):
        return None
    return bdims[-1][1] if bdims else 0


def _layout(shape: tuple, strides: tuple):
    """(sb, sh, sn) with element [b, h, n, c] at sb*b + sh*h + sn*n + c (b: the flattened batch
    dims, h: the last leading dim), from element strides; None if the batch dims do not collapse."""
    sb = _batch_stride(shape, strides)
    return None if sb is None else (sb, strides[-3] if len(shape) > 2 else 0, strides[-2])


def _strides(x, cp):
    """(x, (sb, sh, sn)): element strides with x[b, h, n, c] at sb*b + sh*h + sn*n + c, where
    b runs over all leading dims but the last (flattened) and h over the last. Copies x only
    when its layout has no such form (last dim not contiguous, or batch dims that do not
    collapse into one stride)."""
    x = _unit_stride(x, cp)
    found = _layout(x.shape, tuple(s // x.itemsize for s in x.strides))
    return (x, found) if found is not None else _strides(cp.ascontiguousarray(x), cp)


def _contiguous_layout(shape: tuple) -> tuple:
    """_layout of a C-contiguous array of this shape (the outputs we allocate)."""
    strides, n = [], 1
    for extent in reversed(shape):
        strides.append(n)
        n *= extent
    return _layout(shape, tuple(reversed(strides)))


def window_args(window, Nq: int, Nk: int) -> tuple[int, int]:
    """The kernels' (left, right) from the problem's window ((-1, -1) unbounded): an unbounded
    side clamped to Nk (left) or Nq (right), which covers every row (csrc/fa_mask.cuh)."""
    left, right = window
    return (Nk if left < 0 else min(left, Nk)), (Nq if right < 0 else min(right, Nq))


COMBINE_WARPS = 4           # flash_decode_combine: one warp a query row, 128 threads a block
COMBINE_BLOCKS_MAX = 65535   # its grid strides over the rest


def features(problem):
    """(window, softcap, alibi) of a validated problem (_validate.Problem or varlen's)."""
    return problem.window, problem.softcap, problem.alibi


def mask_options(problem) -> dict:
    """planner.plan's window and score_mod keywords for a validated problem: which MASK variant
    of the kernels its window and score mods need."""
    return {"window": problem.window != (-1, -1), "score_mod": problem.softcap > 0 or problem.alibi is not None}


def _changed(problem, **fields):
    """A copy of a validated problem (a frozen dataclass) with these fields changed: its fields
    copied as they are (dataclasses.replace would run __init__ again: ~9 µs a copy)."""
    changed = object.__new__(type(problem))
    changed.__dict__.update(problem.__dict__, **fields)
    return changed


class Call:
    """One CUDA call with everything but its arrays fixed: the plan's kernels, the outputs' shapes
    and the launch arguments. run() makes one per call; api keeps those of CuPy calls and, when a
    later call's arrays and options match in all that validation and planning read, calls it
    again, skipping ~85 µs of Python (a model's forward repeats its calls step after step)."""

    def __init__(self, problem, plan, device_id: int, layouts: tuple, copies: bool, paging: tuple = (0, 0)):
        self.plan, self.device_id, self.layouts, self.copies = plan, device_id, layouts, copies
        # what for_keys re-plans from, without the arrays (a kept Call must not keep them alive)
        self.problem = _changed(problem, q=None, k=None, v=None)
        self.out_shape, self.dtype = tuple(problem.q.shape), problem.q.dtype
        self.lse_shape = self.out_shape[:-1]
        window, softcap, alibi = features(problem)
        B, H, Nq, Nk = problem.batch, problem.heads, problem.Nq, problem.Nk
        sizes = (B, H, problem.group, Nq, Nk, problem.d, *window_args(window, Nq, Nk))
        os_, ls = _contiguous_layout(self.out_shape), (H * Nq, Nq)
        self.pointers = (null() if alibi is None else alibi, null(), null())   # alibi, cu_q, cu_k
        self.kernel = kernels.get(plan, device_id)   # compiled for device_id (kernels.get sets it)
        if plan.splits:   # split-KV decoding
            # paging: (log2 page, block table row stride) of a paged KV cache (kvcache.py), else (0, 0)
            self.scalars = packed((*sizes, paging[0]), (*sum(layouts, ()), paging[1], *os_, *ls),
                                  (problem.scale, softcap))
            rows = B * H * Nq
            self.work = (rows * plan.splits * plan.head_dim_bound, rows * plan.splits)   # Op, Lp floats
            # the merge: none for one split; by the pair's last split (a count per pair) or a launch
            self.pairs = B * (H // problem.group) if plan.splits > 1 and not plan.combine else 0
            if plan.combine:
                self.combine = kernels.get(kernels.Variant(plan.combine), device_id)
                self.combine_grid = (min(-(-rows // COMBINE_WARPS), COMBINE_BLOCKS_MAX),)
                self.combine_scalars = packed((B, H, Nq, problem.d, plan.head_dim_bound, plan.splits),
                                              (*os_, *ls))
        else:
            self.scalars = packed(sizes, (*sum(layouts, ()), *os_, *ls), (problem.scale, softcap))

    def for_keys(self, q, k, v, Nk: int, window: tuple, plan_of) -> Call:
        """This call for other k and v that differ from its own in the number of keys Nk alone
        (shape and strides otherwise; 1 <= Nk < 2**31): a decoding loop's KV cache, one key longer
        each step. Only what depends on Nk is made again: the window's clamping, the plan (key
        splits, even the kernel) and the scalars; the checks of validation are not repeated.
        Only for a call whose arrays are not copied (api keeps no other for this): a copy's
        strides follow Nk. window: the caller's option; plan_of(problem, device_id): api's planning."""
        p = self.problem
        problem = _changed(p, q=q, k=k, v=v, Nk=Nk, window=window_pair(window, p.causal, p.Nq, Nk))
        return Call(problem, plan_of(problem, self.device_id), self.device_id, self.layouts, False)

    def __call__(self, q, k, v):
        """(O, L) for arrays like those this call was made for (CuPy arrays on its device, or any
        arrays when it copies them there)."""
        cp = cupy()
        with cp.cuda.Device(self.device_id):
            if self.copies:
                q, k, v = (_strides(cp.asarray(x), cp)[0] for x in (q, k, v))
            return self.launch(cp, q, k, v)

    def launch(self, cp, q, k, v, seqlens_k=None, block_table=None):
        """The launches on q, k, v as they are (laid out as the call's strides say), on the
        current stream; the current device must be the call's. Decoding also takes a KV cache's
        lengths and block table (int32 CuPy arrays, kvcache.py)."""
        plan = self.plan
        O = cp.empty(self.out_shape, dtype=self.dtype)
        L = cp.empty(self.lse_shape, dtype=cp.float32)
        if not plan.splits:
            self.kernel(plan.grid, (plan.threads,), (q, k, v, *self.pointers, O, L, *self.scalars),
                        shared_mem=plan.smem_bytes)
            return O, L
        # Decoding over several splits: their partials (O_s, L_s) into a float32 workspace from
        # CuPy's pool (which hands it out again only in stream order, so returning it at the end
        # is safe), then the merge (by the pair's last split or a second launch).
        Op = Lp = null()
        if plan.splits > 1:
            work = cp.empty(sum(self.work), dtype=cp.float32)
            Op, Lp = work[:self.work[0]], work[self.work[0]:]
        cache = tuple(null() if x is None else x for x in (seqlens_k, block_table))
        count = split_counts(cp, self.device_id, self.pairs) if self.pairs else null()
        self.kernel(plan.grid, (plan.threads,), (q, k, v, self.pointers[0], *cache, Op, Lp, count, O, L, *self.scalars),
                    shared_mem=plan.smem_bytes)
        if plan.combine:
            self.combine(self.combine_grid, (32 * COMBINE_WARPS,), (Op, Lp, O, L, *self.combine_scalars))
        return O, L


_COUNTS = threading.local()   # each thread's {(device, stream): int32 counts, zero between launches}


def split_counts(cp, device_id: int, pairs: int):
    """Zeroed int32 counts of at least `pairs` for a fused-merge decoding launch on the current
    stream of device_id (current): each (batch, k/v head)'s splits done, which its last split sets to zero again, so
    one array serves every launch in the stream's order. One per thread, device and stream:
    launches on two streams at once would share counts otherwise, and so would two threads'
    per-thread default streams (one handle, two streams)."""
    table = _COUNTS.__dict__.setdefault("table", {})
    key = (device_id, cp.cuda.get_current_stream().ptr)
    counts = table.get(key)
    if counts is None or counts.size < pairs:
        counts = table[key] = cp.zeros(max(pairs, 1024), dtype=cp.int32)
    return counts


def run(problem, plan, device_id: int):
    """(O, L) as CuPy arrays on device_id: O like q (contiguous), L float32 (..., Nq). GQA needs
    no copies: the kernels read k/v head h // group for q head h."""
    return run_call(problem, plan, device_id)[:2]


def run_call(problem, plan, device_id: int):
    """run()'s (O, L), and the Call that computed them."""
    cp = cupy()
    with cp.cuda.Device(device_id):
        given = (problem.q, problem.k, problem.v)
        (q, qs), (k, ks), (v, vs) = (_strides(cp.asarray(x), cp) for x in given)
        call = Call(problem, plan, device_id, (qs, ks, vs), copies=any(a is not b for a, b in zip((q, k, v), given)))
        O, L = call.launch(cp, q, k, v)
    return O, L, call


def run_kvcache(cache, plan, device_id: int):
    """(O, L, call) of kvcache.py's call by split-KV decoding on the cache as it lies: k_cache's
    dim 0 (batch, or page) stride is the kernel's batch stride, the lengths and the block table
    go as pointers. NumPy inputs are copied to device_id and the results back. call: the Call
    that launched, for kvcache to keep, or None where an array had to be copied or converted."""
    cp = cupy()
    problem = cache.problem
    with cp.cuda.Device(device_id):
        given = (problem.q, cache.k_cache, cache.v_cache, cache.seqlens, cache.table)
        (q, qs), (k, ks), (v, vs) = (_strides(cp.asarray(x), cp) for x in given[:3])
        ks, vs = ((x.strides[0] // x.itemsize, *s[1:]) for x, s in ((k, ks), (v, vs)))   # dim 0 even when 1 long
        seqlens, table = (None if x is None else cp.asarray(x) for x in given[3:])
        paging = (0, 0) if table is None else (cache.page.bit_length() - 1, table.shape[1])
        call = Call(problem, plan, device_id, (qs, ks, vs), copies=False, paging=paging)
        O, L = call.launch(cp, q, k, v, seqlens, table)
    if not problem.on_gpu:
        return O.get(), L.get(), None
    return O, L, call if all(a is b for a, b in zip((q, k, v, seqlens, table), given)) else None


def launch(plan, device_id, q, k, v, O, L, qs, ks, vs, os_, ls, *, batch, heads, group, Nq, Nk, d,
           window, scale, softcap=0.0, alibi=None, cu_q=None, cu_k=None):
    """One launch of plan's kernel: arrays, their element strides (b, h, n) (L's (b, h)), sizes,
    the kernels' window pair, scale, softcap; alibi (float32, one slope per (b, h), contiguous)
    and the varlen offsets cu_q, cu_k (int32, batch + 1 each) or None."""
    args = (q, k, v, null() if alibi is None else alibi, null() if cu_q is None else cu_q,
            null() if cu_k is None else cu_k, O, L,
            *packed((batch, heads, group, Nq, Nk, d, *window), (*qs, *ks, *vs, *os_, *ls), (scale, softcap)))
    kernels.get(plan, device_id)(plan.grid, (plan.threads,), args, shared_mem=plan.smem_bytes)


def run_varlen(problem, device_id: int):
    """(O, L) for a packed variable-length batch (flashattn_cupy.varlen's problem): q (total_q, H,
    d), k, v (total_k, Hkv, d), sequence s at rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] (and
    likewise for k, v). One launch over (tiles of the longest sequence, heads, sequences); tiles
    past a sequence's end return at once, so nothing is padded. O like q, L (H, total_q) float32."""
    from . import _device, planner
    cp = cupy()
    with cp.cuda.Device(device_id):
        q, k, v = (_unit_stride(cp.asarray(x), cp) for x in (problem.q, problem.k, problem.v))
        (total_q, H, d), kv_heads = q.shape, k.shape[1]
        O = cp.empty(q.shape, dtype=q.dtype)
        L = cp.empty((H, total_q), dtype=cp.float32)
        Nq, Nk = int(problem.max_seqlen_q), int(problem.max_seqlen_k)
        if total_q == 0 or Nq == 0:
            return O, L
        cu_q, cu_k = (cp.asarray(c, dtype=cp.int32) for c in (problem.cu_seqlens_q, problem.cu_seqlens_k))
        window, softcap, alibi = features(problem)
        plan = planner.cached_plan(Nq, max(Nk, 1), d, dtype=problem.dtype, causal=problem.causal,
                                   batch=cu_q.size - 1, heads=H, backend="cuda",
                                   smem_limit=_device.smem_limit(device_id),
                                   arch=_device.compute_capability(device_id),
                                   fp32=problem.fp32, decode=False, **mask_options(problem))
        # (b, h, n) element strides with b the sequence: its rows start at cu[b] (the kernels add it)
        rows = lambda x: (0, x.strides[1] // x.itemsize, x.strides[0] // x.itemsize)  # noqa: E731
        launch(plan, device_id, q, k, v, O, L, rows(q), rows(k), rows(v), rows(O), (0, total_q),
               batch=cu_q.size - 1, heads=H, group=H // kv_heads, Nq=Nq, Nk=Nk, d=d,
               window=window_args(window, Nq, Nk), scale=problem.scale, softcap=softcap,
               alibi=alibi, cu_q=cu_q, cu_k=cu_k)
    return O, L
