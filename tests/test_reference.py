"""The oracle itself, checked against the definition written out element by element."""
import math

import numpy as np

from flashattn_cupy import reference


def _by_hand(q, k, v, causal, scale, window=(-1, -1), softcap=0.0, slope=None):
    Nq, Nk = len(q), len(k)
    left, right = (math.inf if w < 0 else w for w in window)
    O, L = [], []
    for i in range(Nq):
        diag = i + (Nk - Nq)
        keys = [j for j in range(Nk) if not (causal and j > diag) and diag - left <= j <= diag + right]
        s = {j: scale * sum(a * b for a, b in zip(q[i], k[j])) for j in keys}
        if softcap:
            s = {j: softcap * math.tanh(x / softcap) for j, x in s.items()}
        if slope is not None:
            s = {j: x - slope * abs(diag - j) for j, x in s.items()}
        if not keys:
            O.append([0.0] * len(v[0]))
            L.append(-math.inf)
            continue
        top = max(s.values())
        total = sum(math.exp(x - top) for x in s.values())
        O.append([sum(math.exp(s[j] - top) / total * v[j][c] for j in keys) for c in range(len(v[0]))])
        L.append(top + math.log(total))
    return np.array(O), np.array(L)


def test_reference_matches_the_definition(rng):
    for Nq, Nk, causal in [(5, 7, False), (5, 7, True), (7, 5, True), (1, 1, True)]:
        q, k, v = rng.standard_normal((Nq, 3)), rng.standard_normal((Nk, 3)), rng.standard_normal((Nk, 3))
        O, L = reference.attention(q, k, v, causal=causal, softmax_scale=0.7)
        O_hand, L_hand = _by_hand(q.tolist(), k.tolist(), v.tolist(), causal, 0.7)
        np.testing.assert_allclose(O, O_hand, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_hand))
        np.testing.assert_allclose(L[np.isfinite(L)], L_hand[np.isfinite(L_hand)], rtol=1e-12)


def test_causal_mask_is_bottom_right_aligned():
    # Nq = 2, Nk = 4: query 0 sees keys 0..2, query 1 sees keys 0..3.
    assert reference.causal_mask(2, 4).tolist() == [[False, False, False, True], [False] * 4]
    # Nq = 4, Nk = 2: queries 0 and 1 see no key at all.
    assert reference.causal_mask(4, 2).tolist() == [[True, True], [True, True], [False, True], [False, False]]


def test_reference_mods_match_the_definition(rng):
    """Sliding windows (bottom-right aligned, -1 unbounded, causal on top), softcap and ALiBi."""
    cases = [(5, 7, False, (1, 0), 0.0, None), (7, 5, False, (0, 0), 0.0, None), (6, 6, True, (2, 3), 0.0, None),
             (5, 9, False, (-1, 1), 1.5, None), (9, 5, True, (-1, -1), 0.0, 0.25), (6, 8, False, (3, -1), 2.0, 0.5),
             (1, 6, False, (0, 0), 0.0, 1.0)]
    for Nq, Nk, causal, window, softcap, slope in cases:
        q, k, v = (rng.standard_normal((n, 3)) * 2 for n in (Nq, Nk, Nk))
        O, L = reference.attention(q, k, v, causal=causal, softmax_scale=0.7, window=window, softcap=softcap,
                                   alibi_slopes=None if slope is None else np.array(slope))
        O_hand, L_hand = _by_hand(q.tolist(), k.tolist(), v.tolist(), causal, 0.7, window, softcap, slope)
        np.testing.assert_allclose(O, O_hand, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_hand))
        np.testing.assert_allclose(L[np.isfinite(L)], L_hand[np.isfinite(L_hand)], rtol=1e-12)


def test_window_mask_is_bottom_right_aligned():
    # Nq = 2, Nk = 4, window (1, 0): query 0 (diagonal key 2) sees keys 1, 2; query 1 sees 2, 3.
    assert (~reference.window_mask(2, 4, (1, 0))).tolist() == [[False, True, True, False], [False, False, True, True]]
    # (-1, 0) is the causal mask; (0, 0) the diagonal alone, (0, -1) the diagonal and after
    assert np.array_equal(reference.window_mask(4, 2, (-1, 0)), reference.causal_mask(4, 2))
    assert np.array_equal(~reference.window_mask(3, 3, (0, 0)), np.eye(3, dtype=bool))
    assert np.array_equal(~reference.window_mask(3, 3, (0, -1)), np.triu(np.ones((3, 3), bool)))


def test_alibi_slopes_broadcast_per_head(rng):
    q, k, v = (rng.standard_normal((2, 3, n, 4)) for n in (5, 6, 6))
    slopes = np.array([0.1, 0.5, 2.0])
    O, L = reference.attention(q, k, v, alibi_slopes=slopes)
    for h in range(3):
        O_h, L_h = reference.attention(q[:, h], k[:, h], v[:, h], alibi_slopes=np.full(2, slopes[h]))
        np.testing.assert_array_equal(O[:, h], O_h)
        np.testing.assert_array_equal(L[:, h], L_h)
