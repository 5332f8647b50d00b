"""A NumPy model of the CUDA kernels' launch interface, so the CUDA backend's plumbing (views,
strides, GQA group, window, score mods, varlen offsets, L's layout) is tested without a GPU.

`use(monkeypatch, launches)` makes _cuda_backend run on NumPy arrays: CuPy's functions become
NumPy's and kernels.get returns `kernel` below, which reads its arguments exactly as
csrc/flash_fwd_{mma,simt}.cu do (element offsets b*sb + h*sh + n*sn + c from each pointer, k/v
head h // group, sequence offsets from cu_q / cu_k, L at b*l_sb + h*l_sh + row) and computes what
csrc/fa_mask.cuh says in float64: scale, softcap, ALiBi, the window for MASK >= 1. It refuses
to address memory outside the array a pointer points into. Each launch's arguments are appended
to `launches` as a dict.
"""
import contextlib
from types import SimpleNamespace

import numpy as np

from flashattn_cupy import _cuda_backend, kernels

_byte_bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds   # NumPy 1 or 2
NAMES = ("q", "k", "v", "alibi", "cu_q", "cu_k", "O", "L", "B", "H", "group", "Nq", "Nk", "d", "left",
         "right", "q_sb", "q_sh", "q_sn", "k_sb", "k_sh", "k_sn", "v_sb", "v_sh", "v_sn", "o_sb", "o_sh",
         "o_sn", "l_sb", "l_sh", "scale", "softcap")


def _flat(x, n):
    """x's memory from its first element on, n elements, as a 1-D view; refuses to reach past
    the buffer x is a view of."""
    owner = x
    while owner.base is not None and isinstance(owner.base, np.ndarray):
        owner = owner.base
    y = np.lib.stride_tricks.as_strided(x, (n,), (x.itemsize,))
    (lo, hi), (owner_lo, owner_hi) = _byte_bounds(y), _byte_bounds(owner)
    assert owner_lo <= lo and hi <= owner_hi, "the launch reads outside its array"
    return y


def _rows(x, start, sn, n, d):
    """n rows of d elements, row r at start + r * sn, as a writable strided view of x's memory."""
    if n == 0:
        return np.zeros((0, d), x.dtype)
    flat = _flat(x, start + (n - 1) * sn + d)
    return np.lib.stride_tricks.as_strided(flat[start:], (n, d), (sn * x.itemsize, x.itemsize))


def make_kernel(mask, launches):
    def kernel(grid, block, args, shared_mem):
        a = dict(zip(NAMES, args))
        launches.append(a)
        B, H, G, d = int(a["B"]), int(a["H"]), int(a["group"]), int(a["d"])
        assert grid[1] == min(H, 65535) and grid[2] == min(B, 65535)
        varlen = isinstance(a["cu_q"], np.ndarray)
        for b in range(B):
            q0, k0 = (int(a["cu_q"][b]), int(a["cu_k"][b])) if varlen else (0, 0)
            nq, nk = ((int(a["cu_q"][b + 1]) - q0, int(a["cu_k"][b + 1]) - k0) if varlen
                      else (int(a["Nq"]), int(a["Nk"])))
            for h in range(H):
                def rows(x, p, n, first, head):
                    sb, sh, sn = (int(a[f"{p}_s{c}"]) for c in "bhn")
                    return _rows(x, b * sb + head * sh + first * sn, sn, n, d)
                Q = rows(a["q"], "q", nq, q0, h).astype(np.float64)
                K = rows(a["k"], "k", nk, k0, h // G).astype(np.float64)
                V = rows(a["v"], "v", nk, k0, h // G).astype(np.float64)
                S = float(a["scale"]) * (Q @ K.T)
                off = np.arange(nq)[:, None] + (nk - nq) - np.arange(nk)[None, :]   # i + shift - j
                if mask == 2 and float(a["softcap"]) > 0:
                    c = float(a["softcap"])
                    S = c * np.tanh(S / c)
                if mask == 2 and isinstance(a["alibi"], np.ndarray):
                    S = S - float(a["alibi"].reshape(-1)[b * H + h]) * np.abs(off)
                if mask >= 1:
                    S = np.where((off <= int(a["left"])) & (-off <= int(a["right"])), S, -np.inf)
                m = S.max(axis=1, keepdims=True, initial=-np.inf)
                m = np.where(np.isneginf(m), 0, m)
                P = np.exp(S - m)
                l_ = P.sum(axis=1, keepdims=True)
                with np.errstate(invalid="ignore", divide="ignore"):
                    O_bh = np.where(l_ == 0, 0, (P @ V) / np.where(l_ == 0, 1, l_))
                    L_bh = np.where(l_[:, 0] == 0, -np.inf, m[:, 0] + np.log(l_[:, 0]))
                rows(a["O"], "o", nq, q0, h)[...] = O_bh
                l_start = b * int(a["l_sb"]) + h * int(a["l_sh"]) + q0
                if nq:
                    _flat(a["L"], l_start + nq)[l_start:] = L_bh
    return kernel


def use(monkeypatch, launches):
    shim = SimpleNamespace(**{name: getattr(np, name) for name in ("asarray", "empty", "float32", "int32",
                                                                   "ascontiguousarray", "broadcast_to")},
                           cuda=SimpleNamespace(Device=lambda _: contextlib.nullcontext()))
    monkeypatch.setattr(_cuda_backend, "cupy", lambda: shim)
    monkeypatch.setattr(kernels, "get", lambda plan, device_id: make_kernel(plan.mask, launches))
