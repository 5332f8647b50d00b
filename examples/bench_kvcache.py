"""A paged KV cache read in place by split-KV decoding, against the same keys in a contiguous cache
and PyTorch SDPA's best decoding backends (a rival, if torch is installed), in one process:

    python examples/bench_kvcache.py

fp16, d = 128, 32 query heads over 8 k/v heads, one query row. Per row: the median of CUDA-event
timings in µs and the rate K and V stream at (their bytes / time). The paged cache holds the same
keys in pages of 16, 64 and 256 rows dealt to the batch in a shuffled order; its output must be
bit-for-bit the contiguous cache's where both decode on the same tiles (same arithmetic, other
addresses). Pages shorter than the contiguous cache's key tile decode on tiles of their own
(planner.decode_tiles: a thread looks up few rows' pages), so other bits: "other tiles" there.
"""
import cupy as cp
import numpy as np

from flashattn_cupy import flash_attention, flash_attention_kvcache, planner
from flashattn_cupy.bench import _gpu_time


def sdpa_rivals(q, k, v):
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))

    def run(backend):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
    return {"sdpa-cudnn": lambda: run(SDPBackend.CUDNN_ATTENTION), "sdpa-flash": lambda: run(SDPBackend.FLASH_ATTENTION)}


def paged(x, table, page):
    """x (B, Hk, N, d) as a page pool (B * N / page, Hk, page, d): batch b's pages at table[b]."""
    B, Hk, N, d = x.shape
    pool = cp.empty((B * N // page, Hk, page, d), x.dtype)
    pool[table.ravel()] = x.reshape(B, Hk, N // page, page, d).transpose(0, 2, 1, 3, 4).reshape(-1, Hk, page, d)
    return pool


def main():
    rng = np.random.default_rng(0)
    limit = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    print("| B | Nk | call | µs | K+V GB/s | same bits as contiguous |\n| --- | --- | --- | --- | --- | --- |")
    for B, Nk in ((8, 32768), (1, 131072)):
        H, Hk, d = 32, 8, 128
        q = cp.asarray(rng.standard_normal((B, H, 1, d), dtype=np.float32)).astype(cp.float16)
        k, v = (cp.asarray(rng.standard_normal((B, Hk, Nk, d), dtype=np.float32)).astype(cp.float16) for _ in range(2))
        gigabytes = 2 * B * Hk * Nk * d * 2 / 1e9
        lengths = cp.full(B, Nk, cp.int32)
        O = flash_attention_kvcache(q, k, v, cache_seqlens=lengths)
        calls = {"flash_attention": (lambda: flash_attention(q, k, v), None),
                 "kvcache, contiguous": (lambda: flash_attention_kvcache(q, k, v, cache_seqlens=lengths), None)}
        for page in (16, 64, 256):
            table = cp.asarray(rng.permutation(B * Nk // page).astype(np.int32)).reshape(B, Nk // page)
            kp, vp = paged(k, table, page), paged(v, table, page)
            f = (lambda kp=kp, vp=vp, table=table:
                 flash_attention_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=table))
            same_tiles = planner.decode_tiles(d, limit, page) == planner.decode_tiles(d, limit)
            calls[f"kvcache, pages of {page}"] = (f, bool(cp.array_equal(f(), O)) if same_tiles else "other tiles")
        calls.update({name: (f, None) for name, f in sdpa_rivals(q, k, v).items()})
        for name, (f, same) in calls.items():
            t = _gpu_time(f, 30)
            print(f"| {B} | {Nk} | {name} | {t * 1e6:.1f} | {gigabytes / t:.0f} | {'-' if same is None else same} |",
                  flush=True)


if __name__ == "__main__":
    main()
