"""flash_attention on CuPy arrays: runs on the current stream, returns CuPy arrays, no host sync.

    python examples/cupy_attention.py        (needs CuPy and a CUDA GPU)
"""
import numpy as np

from flashattn_cupy import flash_attention, plan_for

import cupy as cp

B, H, N, d = 4, 8, 2048, 128
q, k, v = (cp.random.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))
print(plan_for(q, k, v, causal=True))

stream = cp.cuda.Stream(non_blocking=True)
with stream:
    O, L = flash_attention(q, k, v, causal=True, return_lse=True)   # queued on `stream`
stream.synchronize()
O_ref = flash_attention(*(cp.asnumpy(x) for x in (q[:1, :1], k[:1, :1], v[:1, :1])), causal=True,
                        backend="reference")
print(f"O {O.shape} {O.dtype} on GPU {O.device.id}; "
      f"max |O - reference| on head 0 = {np.abs(cp.asnumpy(O[:1, :1]).astype(np.float64) - O_ref).max():.2e}")
