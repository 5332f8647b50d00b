"""What flash_attention must give for inputs holding NaN or ±inf (README, "Non-finite values"):
what the float64 reference gives, the textbook formula in IEEE arithmetic, with one freedom.

The reference forms P V over every key, so 0 * NaN = NaN lets a non-finite v at a causally
masked key reach the row; the kernels skip whole masked tiles but not the masked keys of a tile
they share with seen keys, so whether such a value reaches a row depends on the tiling. There,
and only there, either answer is accepted: the reference's, or the one over the seen keys alone.
"""
import numpy as np

from flashattn_cupy import reference
from tolerances import bounds


def _kind(x):
    """0 NaN, 1 +inf, 2 -inf, 3 finite, elementwise."""
    return np.select([np.isnan(x), np.isposinf(x), np.isneginf(x)], [0, 1, 2], 3)


def seen_keys_only(q, k, v, *, causal=False, softmax_scale=None):
    """O in float64 with each row summing over the keys it sees and no others."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    O = np.zeros(q.shape)
    for i in range(Nq):
        seen = min(Nk, i + 1 + Nk - Nq) if causal else Nk
        if seen > 0:
            O[..., i:i + 1, :] = reference.attention(q[..., i:i + 1, :], k[..., :seen, :], v[..., :seen, :],
                                                     softmax_scale=softmax_scale)[0]
    return O


def assert_nonfinite_like_reference(O, L, q, k, v, *, causal=False, softmax_scale=None, **rounding):
    """O and L have the reference's NaN, +inf and -inf exactly where it has them (up to the
    freedom above), fully masked rows are O = 0 and L = -inf, and the finite entries are within
    the bounds of tolerances.py for the inputs with their non-finite values set to 0. `rounding`:
    bounds() keywords for the kernel that ran (compute, p)."""
    O, L = np.asarray(O).astype(np.float64), np.asarray(L)
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    O_ref, L_ref = reference.attention(q, k, v, **kw)
    O_seen = seen_keys_only(q, k, v, **kw)
    finite_inputs = [np.where(np.isfinite(x), x, 0) for x in (np.asarray(y).astype(np.float64) for y in (q, k, v))]
    tol_O, tol_L = bounds(*finite_inputs, softmax_scale=softmax_scale,
                          out=np.dtype(q.dtype).name, **rounding)

    assert np.array_equal(_kind(L), _kind(L_ref)), "L must be NaN / +-inf / finite where the reference is"
    assert (O[np.isneginf(L_ref)] == 0).all(), "rows with no key to attend to must give O = 0"
    fixed = _kind(O_ref) == _kind(O_seen)
    assert np.array_equal(_kind(O)[fixed], _kind(O_ref)[fixed]), "O must be NaN / +-inf where the reference is"
    free_ok = (_kind(O) == _kind(O_ref)) | (_kind(O) == _kind(O_seen))
    assert free_ok[~fixed].all(), "a masked key's non-finite v gives either the reference's O or the seen keys'"

    finite_L = np.isfinite(L_ref)
    err_L = np.abs(L[finite_L] - L_ref[finite_L]).max(initial=0.0)
    target = np.where(np.isfinite(O_ref), O_ref, O_seen)
    finite_O = np.isfinite(O)
    err_O = np.abs(O[finite_O] - target[finite_O]).max(initial=0.0)
    assert err_O <= tol_O, f"max |O - O_ref| over finite entries = {err_O:.3e} > bound {tol_O:.3e}"
    assert err_L <= tol_L, f"max |L - L_ref| over finite entries = {err_L:.3e} > bound {tol_L:.3e}"
