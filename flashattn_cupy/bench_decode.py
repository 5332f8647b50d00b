"""Decoding benchmark: `python -m flashattn_cupy bench --device gpu --decode`.

Few query rows against a long KV cache (split-KV decoding, csrc/flash_decode.cu), fp16, d = 128,
32 q heads over 8 k/v heads (GQA, group 4): ours against every PyTorch SDPA backend that takes
the call (flash, cuDNN, efficient, math; with enable_gqa=True, or K and V repeated to 32 heads
beforehand where a backend refuses it: marked "rep"), in the same run on the same inputs. Each
time is the median of CUDA-event timings, in microseconds. The decoding figure of merit is the
rate K and V stream at, bytes of K and V read once / time, beside what a plain device-to-device
copy (cupy.copyto of a 1 GiB buffer: read + write bytes / time) reaches in the same run. Each
row also checks our O against SDPA's and says which plan ran (the splits).
"""
from __future__ import annotations

import sys

import numpy as np

from . import flash_attention, plan_for, planner
from .bench import _gpu_time

# (B, H, Hkv, Nq, Nk, d)
DECODE_ROWS = ((8, 32, 8, 1, 32768, 128), (1, 32, 8, 1, 131072, 128), (8, 32, 8, 4, 32768, 128))
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes/s of cupy.copyto between two device buffers of nbytes (read + write counted)."""
    import cupy as cp
    src = cp.ones(nbytes // 2, dtype=cp.float16)
    dst = cp.empty_like(src)
    t = _gpu_time(lambda: cp.copyto(dst, src), repeats)
    del src, dst
    return 2 * nbytes / t


def _sdpa_rivals(q, k, v) -> dict:
    """name -> a callable, for every SDPA backend that runs this call (GQA natively, else repeated K/V)."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        return {}
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    group = tq.shape[1] // tk.shape[1]
    repeated: list = []   # K and V repeated to q's heads, made once if a backend needs them
    rivals = {}
    for name in SDPA_BACKENDS:
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]

        def gqa(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(tq, tk, tv, enable_gqa=True)

        def rep(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(tq, repeated[0], repeated[1])
        try:
            gqa()
            rivals[f"sdpa-{name}"] = gqa
            continue
        except (RuntimeError, TypeError):   # no enable_gqa (older torch), or this backend refuses GQA
            pass
        try:
            if not repeated:
                repeated.extend(x.repeat_interleave(group, dim=1) for x in (tk, tv))
            rep()
            rivals[f"sdpa-{name} (rep)"] = rep
        except (RuntimeError, torch.cuda.OutOfMemoryError):
            pass
    return rivals


def bench_decode(repeats: int = 20) -> list[str]:
    import cupy as cp
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    copy = copy_bandwidth()
    lines = [f"{name.decode() if isinstance(name, bytes) else name}: decoding, fp16, not causal; µs (median of "
             f"{repeats} CUDA-event timings); K+V GB/s = bytes of K and V / time. Device-to-device copy "
             f"(cupy.copyto, 1 GiB, read + write): {copy / 1e9:.0f} GB/s in this run.", "",
             "| B | H / Hkv | Nq | Nk | ours µs | ours K+V GB/s | % of copy | best SDPA | its µs "
             "| ours / best (speed-up) | other SDPA µs | ours one-pass µs | max abs diff vs SDPA | plan |",
             "|" + " --- |" * 14]
    rng = np.random.default_rng(0)
    for B, H, Hkv, Nq, Nk, d in DECODE_ROWS:
        q = cp.asarray(rng.standard_normal((B, H, Nq, d), dtype=np.float32)).astype(cp.float16)
        k, v = (cp.asarray(rng.standard_normal((B, Hkv, Nk, d), dtype=np.float32)).astype(cp.float16)
                for _ in range(2))
        fns = {"ours": lambda: flash_attention(q, k, v)}
        fns.update(_sdpa_rivals(q, k, v))
        times = {n: _gpu_time(fn, repeats) for n, fn in fns.items() if n != "ours"}
        with planner.decode_default(False):   # the one-pass kernel on the same call, for the split's gain
            one_pass = _gpu_time(fns["ours"], repeats)
        ours = _gpu_time(fns["ours"], repeats)
        out = flash_attention(q, k, v)
        plan = plan_for(q, k, v)
        kv_bytes = 2 * B * Hkv * Nk * d * 2
        rate = kv_bytes / ours
        best = min(times, key=lambda n: times[n]) if times else None
        others = ", ".join(f"{n} {t * 1e6:.0f}" for n, t in times.items() if n != best) or "-"
        diff = "-"
        if best is not None:
            import torch
            ref = fns[best]()
            diff = f"{float(cp.abs(out.astype(cp.float32) - cp.asarray(torch.as_tensor(ref).float())).max()):.2e}"
        assert plan is not None
        cells = [str(B), f"{H} / {Hkv}", str(Nq), str(Nk), f"{ours * 1e6:.1f}", f"{rate / 1e9:.0f}",
                 f"{100 * rate / copy:.0f}%", best or "-", f"{times[best] * 1e6:.1f}" if best else "-",
                 f"{times[best] / ours:.2f}" if best else "-", others, f"{one_pass * 1e6:.1f}", diff,
                 f"`{plan.kernel}`, {plan.splits} splits, grid {plan.grid}"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
        del q, k, v, fns
        cp.get_default_memory_pool().free_all_blocks()
    return lines
