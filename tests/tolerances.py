"""How close an attention result must be to the float64 reference, argued once, here.

The kernels and the reference get the same input values (fp16/bf16 inputs are exactly
representable in fp32 and float64), so all the difference is rounding inside the kernel
plus the rounding of the stored outputs. With u the unit roundoff of the compute type
(2^-24 for float32, 2^-53 for float64) and A = |scale| * max_ij sum_k |q_ik| |k_jk| the
largest absolute-value score the data can make:

* scores: each s_ij is a d-term dot product plus a few scalings (scale, log2(e) for the
  exp2 kernels, the subtraction of the row max), so |ds| <= (d + 4) u A (Higham's
  gamma_n bound for a dot product, n = d + 4); doubled for the change of log base.
* weights: exp turns an absolute score error into the same relative error of p_ij, and
  the running sums add, rescale and divide up to Nk terms: relative error <= (Nk + 4) u.
* O = sum_j w_j v_j with weights perturbed relatively by at most eps moves by at most
  2 eps max|v| (numerator and normalizer both move); then O is rounded to its dtype
  (u_out |O| <= u_out max|v|).
* the tensor-core kernel (flash_fwd_mma) rounds operands to what the MMA takes. P (and, for
  fp32 inputs, V) before P V: with the weights w_j = p_j / l and l summed from the unrounded
  p_j, O moves by at most (u_p + u_v) max|v| more. For fp32 inputs also q and k before q k^T:
  each product moves relatively by 2 u_qk, so a score by 2 u_qk A. TF32 keeps 11 significant
  bits, truncated by the tensor core from the fp32 operand (off by < 2^-10: u = 2^-10); 3xTF32
  carries x as hi + lo, hi = x rounded to TF32 (|lo| <= 2^-11 |x|), lo handed over unrounded
  and truncated by the tensor core to 11 bits (off by < 2^-10 |lo| <= 2^-21 |x|). Of
  (hi + lo)(hi' + lo') the MMAs add hi hi' + hi lo' + lo hi': a product is off by hi (lo' - lo'_t) + hi' (lo - lo_t) + lo lo', at most
  (2 + 1/2) 2^-21 |x y|, which 2 u bounds with u = 2^-20 for "tf32x3".
  Its fp32 accumulators add products with truncation and alignment to the largest term
  (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS
  2021): we take u = 2^-22, four times fp32's round-to-nearest unit ("tensor_core").
* L = m + log(l) moves by at most eps (eps bounds the relative error of l too), then is
  rounded to float32: 2^-24 |L|, and |L| <= A + B + log(Nk) (B = 0 without ALiBi, below).
* score mods (csrc/fa_mask.cuh, in the compute type): a sliding window only masks keys (a
  masked key is -inf exactly, weight 0: no rounding), so the bounds above hold with Nk the
  keys. softcap y = c tanh(x / c): d/dx y = 1 - tanh^2 <= 1, so x's error passes through no
  larger; x / c is rounded (u |x| / c in the argument, u |x| <= u A out), tanh is within
  2 ulp in CUDA's tanhf and glibc's (2 u |y| <= 2 u A), and c * tanh rounds once (u A):
  4 u A more per score, and |y| <= |x| <= A still. ALiBi y - b with b = slope |i + shift - j|,
  |b| <= B = max|slope| (max(Nq, Nk) - 1) (the offset is exact in float32 below 2^24):
  b is rounded (u B), y - b too (u (A + B)), and the kernel's later steps on the score (the
  4 operations counted in d + 4 above: log2(e), the row max) now act on |s| <= A + B, 4 u B
  more: u A + 6 u B per score in all.
* split-KV decoding (csrc/flash_decode.cu, `splits` > 0) computes each split's (O_s, L_s) with
  the tensor-core kernel's arithmetic over a subset of the keys, so within (tol_O_s, tol_L_s) =
  the bounds above for Nk keys (A, Nk and max|v| only grow with the key set) with O_s kept in
  float32 (u_out = 2^-24, not the input type's). The combine, in fp32 with expf/logf (a few ulp:
  u = 2^-22), forms w_s = exp(L_s - m) / sum_t exp(L_t - m): every L_s - m is off by at most
  tol_L_s + u D_L (D_L = 2 (A + B) + log Nk bounds |L_s - L_t|, each L_s lying in [min s, A + B + log Nk]),
  exp and the sum over the splits add (splits + 4) u, so each weight is relatively within
  2 eps_w, eps_w = tol_L_s + u (D_L + splits + 4), and, the weights summing to 1, O = sum w_s O_s
  moves by at most tol_O_s + 2 eps_w max|v|, then is rounded once to its dtype. L = m + log(sum)
  moves by at most eps_w, plus its float32 rounding. The merge adds fp32 rounding only: about
  twice the one-pass bound, the same order as the kernel's own.

These are worst-case bounds, not fitted to observed errors: typical errors are ~sqrt of
them. They still catch real bugs: one wrongly masked or dropped key among Nk moves O by
about max|v| / Nk, far above 2 (Nk + 4) u max|v| for any Nk this suite uses, and a wrong
scale, tile or row moves it by O(1). A fully masked row must be exact: O = 0, L = -inf.
"""
from __future__ import annotations

import numpy as np

from flashattn_cupy import reference

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8,
                 "tensor_core": 2.0**-22, "tf32": 2.0**-10, "tf32x3": 2.0**-20}


def kernel_rounding(plan) -> dict:
    """bounds() keywords for the kernel a plan runs (the tensor-core kernel rounds operands)."""
    if plan is not None and getattr(plan, "splits", 0):   # split-KV decoding
        return {"compute": "tensor_core", "p": plan.dtype, "splits": plan.splits}
    if plan is None or not plan.kernel.startswith(("flash_fwd_mma", "flash_fwd_wgmma")):
        return {}
    if plan.dtype != "float32":
        return {"compute": "tensor_core", "p": plan.dtype}
    operand = "tf32x3" if plan.kernel.endswith(", 3>") or plan.kernel.startswith("flash_fwd_wgmma_f32_ws") else "tf32"
    return {"compute": "tensor_core", "qk": operand, "p": operand, "v_round": operand}


def bounds(q, k, v, *, softmax_scale=None, compute="float32", out="float32", qk=None, p=None,
           v_round=None, softcap=0.0, alibi_slopes=None, splits=0):
    """(tol_O, tol_L) for inputs q, k, v (NumPy, any float dtype); qk, p, v_round: the types
    q and k, P, and V are rounded to before their products (None: not rounded); softcap and
    alibi_slopes: the score mods, when on (a window needs no term of its own); splits: split-KV
    decoding's partials (float32), merged in fp32."""
    d, Nq, Nk = q.shape[-1], q.shape[-2], k.shape[-2]
    if splits:
        part_O, part_L = bounds(q, k, v, softmax_scale=softmax_scale, compute=compute, out="float32",
                                qk=qk, p=p, v_round=v_round, softcap=softcap, alibi_slopes=alibi_slopes)
        A = score_bound(q, k, v, softmax_scale) + alibi_bound(alibi_slopes, Nq, Nk)
        u = UNIT_ROUNDOFF["tensor_core"]
        eps_w = part_L + u * (2 * A + np.log(Nk) + splits + 4)
        vmax = float(np.abs(v).max())
        return (part_O + 2 * eps_w * vmax + UNIT_ROUNDOFF[out] * vmax,
                eps_w + UNIT_ROUNDOFF["float32"] * (A + np.log(Nk) + 1))
    A = score_bound(q, k, v, softmax_scale)
    B = alibi_bound(alibi_slopes, Nq, Nk)
    u = UNIT_ROUNDOFF[compute]
    u_of = lambda name: UNIT_ROUNDOFF[name] if name else 0.0  # noqa: E731
    mods = (4 * u * A if softcap > 0 else 0.0) + (u * A + 6 * u * B if alibi_slopes is not None else 0.0)
    eps = 2 * (((d + 4) * u + 2 * u_of(qk)) * A + mods) + (Nk + 4) * u
    vmax = float(np.abs(v).max())
    tol_O = 2 * eps * vmax + (u_of(out) + u_of(p) + u_of(v_round)) * vmax
    tol_L = eps + UNIT_ROUNDOFF["float32"] * (A + B + np.log(Nk))
    return tol_O, tol_L


def alibi_bound(alibi_slopes, Nq, Nk) -> float:
    """B = max|slope| (max(Nq, Nk) - 1): no ALiBi bias of these sizes is larger (0 without)."""
    if alibi_slopes is None:
        return 0.0
    return float(np.abs(np.asarray(alibi_slopes, np.float64)).max(initial=0.0)) * (max(Nq, Nk) - 1)


def score_bound(q, k, v, softmax_scale=None) -> float:
    """A = |scale| * max_ij sum_k |q_ik| |k_jk|: no score of these inputs is larger in magnitude."""
    q, k, _ = reference.grouped(*(np.asarray(x).astype(np.float64) for x in (q, k, v)))
    scale = 1.0 / np.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return abs(scale) * float((np.abs(q) @ np.swapaxes(np.abs(k), -1, -2)).max())


def assert_attention_close(O, L, q, k, v, *, causal=False, softmax_scale=None,
                           compute="float32", out=None, qk=None, p=None, v_round=None,
                           window=None, softcap=0.0, alibi_slopes=None, splits=0):
    """Check (O, L) against the float64 reference with the bounds above. softcap is rounded to
    float32 first, as flash_attention does; alibi_slopes must be the float32 values it used."""
    O = np.asarray(O).astype(np.float64)
    L = np.asarray(L)
    assert L.dtype == np.float32, f"L must be float32, got {L.dtype}"
    assert O.shape == q.shape and L.shape == q.shape[:-1]
    softcap = float(np.float32(softcap))
    O_ref, L_ref = reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window,
                                       softcap=softcap, alibi_slopes=alibi_slopes)
    out = out or np.dtype(q.dtype).name
    tol_O, tol_L = bounds(q, k, v, softmax_scale=softmax_scale, compute=compute, out=out, qk=qk,
                          p=p, v_round=v_round, softcap=softcap, alibi_slopes=alibi_slopes, splits=splits)
    assert not np.isnan(O).any() and not np.isnan(L).any(), "NaN in the output"
    masked = np.isneginf(L_ref)
    assert np.array_equal(np.isneginf(L), masked), "L = -inf exactly on the fully masked rows"
    assert (O[masked] == 0).all(), "fully masked rows must give O = 0"
    err_O = float(np.abs(O - O_ref).max())
    err_L = float(np.abs(L[~masked] - L_ref[~masked]).max()) if (~masked).any() else 0.0
    assert err_O <= tol_O, f"max |O - O_ref| = {err_O:.3e} > bound {tol_O:.3e}"
    assert err_L <= tol_L, f"max |L - L_ref| = {err_L:.3e} > bound {tol_L:.3e}"
    return err_O, err_L


def merge_bounds(part_a, part_b, L_a, L_b, vmax, *, compute="float32", out="float32"):
    """(tol_O, tol_L) for merge_attention of parts a and b (each within its own (tol_O, tol_L) of
    the exact attention over its keys) against the exact attention over both key sets.

    The exact merge is O = w O_a + (1 - w) O_b with w = 1 / (1 + exp(L_b - L_a)), and
    L = log(exp(L_a) + exp(L_b)). Errors the parts bring: O moves by at most the larger part
    error, plus dw |O_a - O_b| with |dw| <= (dL_a + dL_b) / 4 (w' <= 1/4) and |O_a - O_b| <=
    2 max|v|; L, a logsumexp, moves by at most the larger dL (it is 1-Lipschitz in the max norm).
    The merge's own rounding (unit u of the compute type; rows with a finite L): L_b - L_a is
    rounded to within u D, D = max |L_a - L_b|; exp, the sum s of the two weights and the
    divisions by it add about 4 u, so the weights are within u (D + 4) relatively and O within
    that of max|v|, plus 2 u for its sum and its own rounding to `out`. log(s), s in [1, 2], is
    off by u (D + 4) too, and m + log(s) is rounded to compute and then float32: 2^-24 |L| each.
    """
    finite = np.isfinite(L_a) & np.isfinite(L_b)
    D = float(np.abs(L_a - L_b)[finite].max()) if finite.any() else 0.0
    Lmax = float(np.abs(np.concatenate([L_a[np.isfinite(L_a)], L_b[np.isfinite(L_b)]])).max(initial=0.0))
    return _merge_bounds(part_a, part_b, D, Lmax, vmax, compute=compute, out=out)


def _merge_bounds(part_a, part_b, D, Lmax, vmax, *, compute, out):
    """merge_bounds with D >= max |L_a - L_b| and Lmax >= max |L| given."""
    (tol_O_a, tol_L_a), (tol_O_b, tol_L_b) = part_a, part_b
    u = UNIT_ROUNDOFF[compute]
    tol_O = (max(tol_O_a, tol_O_b) + (tol_L_a + tol_L_b) / 2 * vmax
             + (u * (D + 6) + UNIT_ROUNDOFF[out]) * vmax)
    tol_L = max(tol_L_a, tol_L_b) + u * (D + 4) + (u + UNIT_ROUNDOFF["float32"]) * (Lmax + 1)
    return tol_O, tol_L


def ring_bounds(q, k, v, parts, *, softmax_scale=None, compute="float32", out="float32", kernel=None):
    """(tol_O, tol_L) for attention computed as up to `parts` parts over disjoint key sets, each
    by the kernel, merged one at a time into a running (O, L) (ring attention: a row meets at
    most one part per key chunk), against the exact attention over all keys. The merges compute
    in `compute`; kernel: the bounds() keywords of the kernel that computes the parts, out among
    them the dtype it returns them in (on the GPU, kernel_rounding(plan) and out=q's dtype); by
    default it computes in `compute` and returns that.

    Each part's keys are a subset of k, so its bounds() (A, Nk and max|v| only grow with the key
    set) are at most the whole problem's. Every L met on the way is a logsumexp over a nonempty
    key subset S: min_S s_j <= L_S <= max_S s_j + log |S|, so |L| <= A + log Nk =: Lmax and
    |L_a - L_b| <= 2 A + log Nk =: D, data-derived and order-free. The first part merged into
    the empty (O = 0, L = -inf) start is taken exactly; each later one is merge_bounds' step.
    """
    # the running O stays in the compute type until the last rounding; each part as the kernel returns it
    part = bounds(q, k, v, softmax_scale=softmax_scale, **{"compute": compute, "out": compute, **(kernel or {})})
    Lmax = score_bound(q, k, v, softmax_scale) + np.log(k.shape[-2])
    vmax = float(np.abs(v).max())
    tol = part
    for _ in range(parts - 1):
        tol = _merge_bounds(tol, part, 2 * Lmax, Lmax, vmax, compute=compute, out=compute)
    return tol[0] + UNIT_ROUNDOFF[out] * vmax, tol[1]   # O rounded once to its dtype at the end
