// fa_softmax.cuh: Algorithm 1's row work on m-tiles of Sij, for the tensor-core kernels
// (flash_fwd_mma.cu, flash_fwd_wgmma.cu; flash_decode.cu, which masks its own rows). Sij sits in the accumulator layout
// that mma.sync m16n8 and wgmma m64nN share: thread (g = lane / 4, t = lane % 4) of a warp holds,
// for each 8-key tile nt of its 16 rows, s[nt][e] = (row g + 8 (e / 2), key 8 nt + 2t + e % 2).
// The 4 threads of a quad share a row; a row's max and sum meet by two xor shuffles.
#pragma once
#include "fa_mma.cuh"
#include "fa_mask.cuh"

// Line 9 in the log2 domain (mi = sl2 * max, sl2 = scale * log2 e): mi_new = max(mi, sl2 rowmax Sij),
// Pij = exp2(sl2 Sij - mi_new) in place of Sij, li = alpha li + rowsum Pij with alpha = exp2(mi -
// mi_new) (exactly 1 when the max stayed). li is this thread's share; the quad sums it at the end.
// Returns whether a row max of this thread moved (then Oi needs diag(alpha)).
template <int NS>
__device__ __forceinline__ bool softmax_rows(float (&s)[NS][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             float sl2) {
    const float neg_inf = __int_as_float(0xff800000);
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = neg_inf;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[r], mx * sl2);
        const float base = m_new == neg_inf ? 0.f : m_new;   // all masked so far: no NaN
        alpha[r] = fast_exp2(m[r] - base);
        moved |= m_new != m[r];
        float rowsum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
                s[nt][e] = fast_exp2(fmaf(s[nt][e], sl2, -base));
                rowsum += s[nt][e];
            }
        l[r] = alpha[r] * l[r] + rowsum;
        m[r] = m_new;
    }
    return moved;
}

// Line 10's diag(alpha) Oi. Callers skip it (exactly) when no row max of the warp moved
// (__any_sync of softmax_rows' results): past the first tiles it rarely does.
template <int ND>
__device__ __forceinline__ void rescale_rows(float (&o)[ND][4], const float (&alpha)[2]) {
#pragma unroll
    for (int dt = 0; dt < ND; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
}

// -inf for the scores of rows g, g + 8 (r = 0, 1) outside keys lo[r]..hi[r] of the tile (offsets
// from its first key: fa_window::seen): two 32-bit compares and a select a score.
template <int NS>
__device__ __forceinline__ void mask_outside(float (&s)[NS][4], const int (&lo)[2], const int (&hi)[2]) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = nt * 8 + 2 * t + e % 2;
            if (c < lo[e / 2] || c > hi[e / 2]) s[nt][e] = __int_as_float(0xff800000);
        }
}

// Score mods (softcap, ALiBi) on every score; then, on edge tiles only (keys past nk or outside
// some row's window), the mask: -inf. s holds MT m-tiles of 16 rows from wrow0 on (the window's
// row index), NS * 8 keys from col0 on. One edge test for all MT tiles: a test per m-tile costs
// the mma kernel registers it has no spare of.
template <int MT, int NS, int MASK>
__device__ __forceinline__ void mask_scores(float (&s)[MT][NS][4], const fa_window& win, int wrow0, int col0, int nk,
                                            float scale, float softcap, float slope) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    if constexpr (MASK == FA_MODS) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[mt][nt][e] = score_mod(s[mt][nt][e], fabsf(scale), softcap, slope,
                                         win.diag(wrow0 + mt * 16 + g + e / 2 * 8) - (col0 + nt * 8 + 2 * t + e % 2));
    }
    if (col0 + NS * 8 > nk || (MASK && !win.covers(wrow0, 16 * MT, col0, NS * 8))) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            int lo[2], hi[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) win.seen<MASK != 0>(wrow0 + mt * 16 + g + 8 * r, col0, NS * 8, nk, lo[r], hi[r]);
            mask_outside<NS>(s[mt], lo, hi);
        }
    }
}

// Pij's 16 keys 16 kk .. 16 kk + 15 as the A operand of an m16 k16 MMA (mma.sync or wgmma from
// registers), rounded to T: its registers are Sij tiles 2 kk and 2 kk + 1, rows g and g + 8.
template <typename T, int ARCH, int NS>
__device__ __forceinline__ void p_fragment(unsigned (&a)[4], const float (&s)[NS][4], int kk) {
    a[0] = pack2<T, ARCH>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack2<T, ARCH>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack2<T, ARCH>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack2<T, ARCH>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Lines 12-15 for rows g, g + 8: the quad's li summed; inv = 1 / li, or 0 for a row whose every key
// was masked (li = 0: O = 0 is chosen, not 0 * inf); lse = Li = mi ln 2 + ln li (natural log), -inf then.
__device__ __forceinline__ void finish_rows(float (&l)[2], const float (&m)[2], float (&inv)[2], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = l[r] == 0.f ? 0.f : 1.f / l[r];
        lse[r] = l[r] == 0.f ? __int_as_float(0xff800000) : m[r] * 0.6931471805599453f + logf(l[r]);
    }
}

// Oi / li with finish_rows' inv: exactly 0 for a row with every key masked, even where Oi is NaN
// (0 * inf from an inf in Vj).
__device__ __forceinline__ float out_value(float o, float inv) { return inv == 0.f ? 0.f : o * inv; }
