"""A NumPy model of the CUDA kernels' launch interface, so the CUDA backend's plumbing (views,
strides, GQA group, window, score mods, varlen offsets, L's layout) is tested without a GPU.

`use(monkeypatch, launches)` makes _cuda_backend run on NumPy arrays: CuPy's functions become
NumPy's and kernels.get returns `kernel` below, which reads its arguments exactly as
csrc/flash_fwd_{mma,simt}.cu do (element offsets b*sb + h*sh + n*sn + c from each pointer, k/v
head h // group, sequence offsets from cu_q / cu_k, L at b*l_sb + h*l_sh + row) and computes what
csrc/fa_mask.cuh says in float64: scale, softcap, ALiBi, the window for MASK >= 1. It refuses
to address memory outside the array a pointer points into. Each launch's arguments are appended
to `launches` as a dict. Split-KV decoding's two kernels (csrc/flash_decode.cu) are modelled the
same way: `decode_kernel` computes each split's partial (O_s, L_s) over the key tiles the kernel
gives that split (`split_tiles`) and writes them where the kernel does in the workspace (one
split: to O and L), and merges them where the launch fuses the merge (a count array passed);
`combine_kernel` merges them as the combine kernel does, in float64.
"""
import contextlib
from types import SimpleNamespace

import numpy as np

from flashattn_cupy import _cuda_backend, kernels

_byte_bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds   # NumPy 1 or 2
NAMES = ("q", "k", "v", "alibi", "cu_q", "cu_k", "O", "L", "B", "H", "group", "Nq", "Nk", "d", "left",
         "right", "q_sb", "q_sh", "q_sn", "k_sb", "k_sh", "k_sn", "v_sb", "v_sh", "v_sn", "o_sb", "o_sh",
         "o_sn", "l_sb", "l_sh", "scale", "softcap")



def _number(x):
    """A launch argument as the kernel reads it: _cuda_backend's Values (where CuPy is present)
    hold theirs in .value."""
    return getattr(x, "value", x)


def _softmax_rows(S, V):
    """(O, L) of scores S (rows, keys) against V in float64: a row with every key masked gives
    O = 0 and L = -inf, as the kernels write it."""
    m = S.max(axis=1, keepdims=True, initial=-np.inf)
    m = np.where(np.isneginf(m), 0, m)
    P = np.exp(S - m)
    l_ = P.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(l_ == 0, 0, (P @ V) / np.where(l_ == 0, 1, l_)),
                np.where(l_[:, 0] == 0, -np.inf, m[:, 0] + np.log(l_[:, 0])))

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
        a = dict(zip(NAMES, map(_number, args)))
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
                O_bh, L_bh = _softmax_rows(S, V)
                rows(a["O"], "o", nq, q0, h)[...] = O_bh
                l_start = b * int(a["l_sb"]) + h * int(a["l_sh"]) + q0
                if nq:
                    _flat(a["L"], l_start + nq)[l_start:] = L_bh
    return kernel


DECODE_NAMES = ("q", "k", "v", "alibi", "seqlens", "table", "Op", "Lp", "count", "O", "L", "B", "H", "group", "Nq",
                "Nk", "d", "left", "right", "page_shift", "q_sb", "q_sh", "q_sn", "k_sb", "k_sh", "k_sn", "v_sb",
                "v_sh", "v_sn", "bt_sb", "o_sb", "o_sh", "o_sn", "l_sb", "l_sh", "scale", "softcap")
COMBINE_NAMES = ("Op", "Lp", "O", "L", "B", "H", "Nq", "d", "pitch", "splits", "o_sb", "o_sh", "o_sn",
                 "l_sb", "l_sh")


def split_tiles(Nq, Nk, BC, splits, split, mask, left, right):
    """The key tiles (of BC keys) split `split` of `splits` streams, in order, as flash_decode
    computes them: the tiles some query row sees (fa_window.tiles with rows 0..Nq-1), [j0, j1),
    dealt round-robin: j0 + split, j0 + split + splits, ... (none when split >= j1 - j0)."""
    j0, j1 = 0, -(-Nk // BC)
    if mask:
        first, last = (Nk - Nq) - left, (Nk - 1) + right
        if last < 0 or first >= Nk or first > last:
            j1 = j0
        else:
            j0, j1 = (0 if first <= 0 else first // BC), min(last // BC + 1, j1)
    return list(range(j0 + split, j1, splits))


def _scores(a, mask, Q, K, rows_i, keys, slopes, Nk=None):
    """The scaled, modded, masked scores of query rows rows_i (their slopes) against keys (of Nk,
    by default the launch's)."""
    Nq, Nk = int(a["Nq"]), int(a["Nk"]) if Nk is None else Nk
    S = float(a["scale"]) * (Q @ K.T)
    off = rows_i[:, None] + (Nk - Nq) - keys[None, :]
    if mask == 2 and float(a["softcap"]) > 0:
        c = float(a["softcap"])
        S = c * np.tanh(S / c)
    if mask == 2:
        S = S - slopes[:, None] * np.abs(off)
    if mask >= 1:
        S = np.where((off <= int(a["left"])) & (-off <= int(a["right"])), S, -np.inf)
    return S


def decode_kernel(plan, launches):
    mask, BC, D = plan.mask, plan.Bc, plan.head_dim_bound

    def kernel(grid, block, args, shared_mem):
        a = dict(zip(DECODE_NAMES, map(_number, args)))
        launches.append(dict(a, kernel=plan.kernel, grid=grid, block=block, shared_mem=shared_mem))
        B, H, G, Nq, Nk, d = (int(a[n]) for n in ("B", "H", "group", "Nq", "Nk", "d"))
        Hk, splits, R = H // G, grid[0], G * Nq
        assert R <= 16 and grid[1] == min(Hk, 65535) and grid[2] == min(B, 65535)
        assert block == (plan.threads,) and shared_mem == plan.smem_bytes
        Op, Lp, count = a["Op"], a["Lp"], a["count"]
        fused = isinstance(count, np.ndarray)
        assert (splits == 1) == (not isinstance(Op, np.ndarray)) and not (fused and splits == 1)
        if fused:
            assert count.dtype == np.int32 and count.size >= B * Hk and not count.any()   # zero at launch
        lengths, table = (a[n] if isinstance(a[n], np.ndarray) else None for n in ("seqlens", "table"))
        shift = int(a["page_shift"])
        for b in range(B):
            # a KV cache: batch b's own number of keys (clamped), its keys' rows found through its pages
            nk = Nk if lengths is None else min(max(int(_flat(lengths, b + 1)[b]), 0), Nk)
            for hk in range(Hk):
                def rows(x, p, n, first, head):
                    sb, sh, sn = (int(a[f"{p}_s{c}"]) for c in "bhn")
                    return _rows(x, b * sb + head * sh + first * sn, sn, n, d)

                def key_rows(x, p, keys):
                    if table is None:
                        return rows(x, p, Nk, 0, hk)[keys]
                    sb, sh, sn = (int(a[f"{p}_s{c}"]) for c in "bhn")
                    first = b * int(a["bt_sb"])
                    pages = _flat(table, first + (-(-nk >> shift)))   # batch b's pages that hold keys
                    return np.array([_rows(x, int(pages[first + (j >> shift)]) * sb + hk * sh
                                           + (j & ((1 << shift) - 1)) * sn, sn, 1, d)[0] for j in keys]).reshape(-1, d)
                r = np.arange(R)
                Q = np.stack([rows(a["q"], "q", 1, int(i), hk * G + int(h))[0] for h, i in zip(r // Nq, r % Nq)])
                slopes = (np.asarray(a["alibi"]).reshape(-1)[b * H + hk * G + r // Nq].astype(np.float64)
                          if isinstance(a["alibi"], np.ndarray) else np.zeros(R))
                for s in range(splits):
                    tiles = split_tiles(Nq, nk, BC, splits, s, mask, int(a["left"]), int(a["right"]))
                    keys = (np.asarray(tiles, dtype=np.int64)[:, None] * BC + np.arange(BC)).ravel()
                    keys = keys[keys < nk]
                    K = key_rows(a["k"], "k", keys).astype(np.float64)
                    V = key_rows(a["v"], "v", keys).astype(np.float64)
                    S = _scores(a, mask, Q.astype(np.float64), K, r % Nq, keys, slopes, nk)
                    O_s, L_s = _softmax_rows(S, V)
                    row = (b * H + hk * G) * Nq + r          # (b, q head, query) flattened
                    for n in range(R):
                        h, i = hk * G + n // Nq, n % Nq
                        if splits == 1:   # the outputs, directly
                            _write_row(a, b, h, i, d, O_s[n], L_s[n])
                            continue
                        start = int((row[n] * splits + s) * D)
                        _flat(Op, start + d)[start:] = O_s[n]
                        _flat(Lp, int(row[n] * splits + s) + 1)[int(row[n] * splits + s)] = L_s[n]
                if fused:   # the pair's last split merges its rows
                    for n in range(R):
                        _merge_row(a, b, hk * G + n // Nq, n % Nq, splits, D, d)
    return kernel


def _write_row(a, b, h, i, d, O, L):
    """Query row (b, h, i)'s O (d values) and L into the outputs, at their strides."""
    _rows(a["O"], b * int(a["o_sb"]) + h * int(a["o_sh"]) + i * int(a["o_sn"]), 1, 1, d)[0] = O
    at = b * int(a["l_sb"]) + h * int(a["l_sh"]) + i
    _flat(a["L"], at + 1)[at] = L


def _merge_row(a, b, h, i, splits, pitch, d):
    """Query row (b, h, i)'s splits merged from the workspace (a launch's Op, Lp) into O and L,
    in float64: merge.py's math, as the combine kernel and flash_decode's fused merge do it."""
    row = (b * int(a["H"]) + h) * int(a["Nq"]) + i
    Ls = _flat(a["Lp"], (row + 1) * splits)[row * splits:].astype(np.float64)
    Os = _rows(a["Op"], row * splits * pitch, pitch, splits, d).astype(np.float64)
    m = Ls.max()
    base = 0.0 if np.isneginf(m) else m
    w = np.exp(Ls - base)
    total = w.sum()
    _write_row(a, b, h, i, d, np.zeros(d) if total == 0 else (w / total) @ Os,
               -np.inf if total == 0 else base + np.log(total))


def combine_kernel(launches):
    def kernel(grid, block, args, shared_mem=0):
        a = dict(zip(COMBINE_NAMES, map(_number, args)))
        launches.append(dict(a, kernel="combine", grid=grid, block=block))
        B, H, Nq, d, pitch, splits = (int(a[n]) for n in ("B", "H", "Nq", "d", "pitch", "splits"))
        assert grid[0] * block[0] // 32 >= min(B * H * Nq, 65535 * 4)
        for b in range(B):
            for h in range(H):
                for i in range(Nq):
                    _merge_row(a, b, h, i, splits, pitch, d)
    return kernel


def get(plan, launches):
    """The model of plan's kernel (kernels.get's stand-in)."""
    if plan.kernel.startswith("flash_decode_combine"):
        return combine_kernel(launches)
    if plan.kernel.startswith("flash_decode"):
        return decode_kernel(plan, launches)
    return make_kernel(plan.mask, launches)


def use(monkeypatch, launches):
    shim = SimpleNamespace(**{name: getattr(np, name) for name in ("asarray", "empty", "float32", "int32",
                                                                   "ascontiguousarray", "broadcast_to")},
                           cuda=SimpleNamespace(Device=lambda _: contextlib.nullcontext()))
    monkeypatch.setattr(_cuda_backend, "cupy", lambda: shim)
    monkeypatch.setattr(kernels, "get", lambda plan, device_id: get(plan, launches))
    monkeypatch.setattr(_cuda_backend, "split_counts", lambda cp, device_id, pairs: np.zeros(pairs, np.int32))
