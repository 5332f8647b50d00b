"""flash_attention on NumPy arrays (the C twin), checked against the float64 reference.

    python examples/numpy_attention.py
"""
import numpy as np

from flashattn_cupy import flash_attention, plan_for, reference

rng = np.random.default_rng(0)
B, H, Nq, Nk, d = 2, 4, 300, 500, 64          # Nq != Nk: a causal mask is bottom-right aligned
q, k, v = (rng.standard_normal((B, H, N, d), dtype=np.float32) for N in (Nq, Nk, Nk))

print(plan_for(q, k, v, causal=True))
O, L = flash_attention(q, k, v, causal=True, return_lse=True)
O_ref, L_ref = reference.attention(q, k, v, causal=True)
print(f"O {O.shape} {O.dtype}, L {L.shape} {L.dtype}")
print(f"max |O - reference| = {np.abs(O - O_ref).max():.2e}, max |L - reference| = {np.abs(L - L_ref).max():.2e}")
