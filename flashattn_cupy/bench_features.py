"""GPU benchmark rows for the model features (`python -m flashattn_cupy bench --device gpu
--features`): a sliding window against full causal attention and against PyTorch SDPA given the
same window as a boolean mask; a packed variable-length batch against the same sequences padded.
TFLOP/s count the work each call must do: 4·d·H·(scores a row sees) summed over rows."""
from __future__ import annotations

import numpy as np

from .bench import _gpu_time


def _pairs_seen(Nq: int, Nk: int, left: int | None, right: int | None) -> int:
    """How many (query, key) pairs a window (None: unbounded) lets through, bottom-right aligned."""
    i = np.arange(Nq, dtype=np.int64) + (Nk - Nq)
    lo = np.zeros(Nq, np.int64) if left is None else np.maximum(i - left, 0)
    hi = np.full(Nq, Nk - 1, np.int64) if right is None else np.minimum(i + right, Nk - 1)
    return int(np.maximum(hi - lo + 1, 0).sum())


def window_rows(repeats: int = 10) -> list[str]:
    import cupy as cp
    from .api import flash_attention
    lines = ["Sliding window (fp16, d = 128, H = 16, B = 1, window (left, 0), causal; TFLOP/s count the "
             "pairs each row sees):", "",
             "| N | attention | ms | TFLOP/s | full causal / this |", "| --- | --- | --- | --- | --- |"]
    rng = np.random.default_rng(0)
    for N in (16384, 65536):
        q, k, v = (cp.asarray(rng.standard_normal((1, 16, N, 128), dtype=np.float32).astype(np.float16))
                   for _ in range(3))
        runs = {"ours, full causal": (lambda: flash_attention(q, k, v, causal=True), None),
                "ours, window 4096": (lambda: flash_attention(q, k, v, causal=True, window=(4096, 0)), 4096)}
        sdpa = _sdpa_window(q, k, v, 4096) if N <= 16384 else {}
        runs.update({name: (fn, 4096) for name, fn in sdpa.items()})
        times = {name: _gpu_time(fn, repeats) for name, (fn, _) in runs.items()}
        full = times["ours, full causal"]
        for name, (_, left) in runs.items():
            flops = 4 * 128 * 16 * _pairs_seen(N, N, left, 0)
            lines.append(f"| {N} | {name} | {times[name] * 1e3:.3f} | {flops / times[name] / 1e12:.1f} | "
                         f"{full / times[name]:.2f} |")
        del q, k, v, sdpa
    return lines


def _sdpa_window(q, k, v, left: int) -> dict:
    """PyTorch SDPA with the window as a boolean mask (it has no native window), and its causal."""
    try:
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        return {}
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    N = q.shape[-2]
    i = torch.arange(N, device=tq.device)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)
    return {"torch SDPA, boolean window mask": lambda: sdpa(tq, tk, tv, attn_mask=mask),
            "torch SDPA, is_causal (full)": lambda: sdpa(tq, tk, tv, is_causal=True)}


def varlen_rows(repeats: int = 10) -> list[str]:
    import cupy as cp
    from .api import flash_attention
    from .varlen import flash_attention_varlen
    rng = np.random.default_rng(0)
    H, d, top = 16, 128, 4096
    lens = rng.integers(1, top + 1, size=32)
    cu = cp.asarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    total = int(lens.sum())
    q, k, v = (cp.asarray(rng.standard_normal((total, H, d), dtype=np.float32).astype(np.float16))
               for _ in range(3))
    padded = [cp.asarray(rng.standard_normal((len(lens), H, top, d), dtype=np.float32).astype(np.float16))
              for _ in range(3)]
    lines = [f"Variable length (fp16, d = {d}, H = {H}, {len(lens)} sequences of 1..{top} tokens, "
             f"{total} in all, against the same batch padded to {top}; TFLOP/s count the work each "
             "call must do):", "",
             "| causal | call | ms | µs per real token | TFLOP/s |", "| --- | --- | --- | --- | --- |"]
    for causal in (False, True):
        real = sum(4 * d * H * _pairs_seen(n, n, None, 0 if causal else None) for n in lens.tolist())
        dense = len(lens) * 4 * d * H * _pairs_seen(top, top, None, 0 if causal else None)
        t_var = _gpu_time(lambda: flash_attention_varlen(q, k, v, cu, cu, top, top, causal=causal), repeats)
        t_pad = _gpu_time(lambda: flash_attention(*padded, causal=causal), repeats)
        lines.append(f"| {causal} | varlen | {t_var * 1e3:.3f} | {t_var / total * 1e6:.3f} | {real / t_var / 1e12:.1f} |")
        lines.append(f"| {causal} | padded to {top} | {t_pad * 1e3:.3f} | {t_pad / total * 1e6:.3f} | "
                     f"{dense / t_pad / 1e12:.1f} |")
    return lines


def bench_features() -> list[str]:
    return window_rows() + [""] + varlen_rows()
