"""The oracle itself, checked against the definition written out element by element."""
import math

import numpy as np

from flashattn_cupy import reference


def _by_hand(q, k, v, causal, scale):
    Nq, Nk = len(q), len(k)
    O, L = [], []
    for i in range(Nq):
        keys = [j for j in range(Nk) if not (causal and j > i + (Nk - Nq))]
        s = {j: scale * sum(a * b for a, b in zip(q[i], k[j])) for j in keys}
        if not keys:
            O.append([0.0] * len(v[0]))
            L.append(-math.inf)
            continue
        total = sum(math.exp(x) for x in s.values())
        O.append([sum(math.exp(s[j]) / total * v[j][c] for j in keys) for c in range(len(v[0]))])
        L.append(math.log(total))
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
