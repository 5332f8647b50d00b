// flash_fwd_simt.cu: FlashAttention-2 forward, Algorithm 1, on the CUDA cores (any sm_75+).
//
// One block computes one Q tile (BR rows) of one (batch, head); K/V tiles of BC rows stream
// through shared memory; the softmax is online (running max mi, running sum li), so nothing
// of size Nq x Nk exists. Everything is fp32 in shared memory whatever T is. Scores are kept
// in the log2 domain (Q is pre-scaled by scale * log2(e)) so the exponentials are exp2f.
//
// Compile-time: T (float, fa_half, fa_bfloat16), tile sizes BR, BC, the head-dim bound D
// (d <= D; columns d..D-1 are zero-padded), the thread count NT and MASK (fa_mask.cuh: none,
// window, window + score mods). Per call (fa_mask.cuh): the ALiBi slopes and varlen offsets,
// sizes, window, element strides of Q, K, V, O (last dimension contiguous) and L, scale, softcap.
// The planner (flashattn_cupy/planner.py) mirrors the shared-memory layout below exactly.
#include "fa_dtypes.cuh"
#include "fa_mask.cuh"

template <typename T, int BR, int BC, int D, int NT, int MASK>
__global__ void __launch_bounds__(NT)
flash_fwd_simt(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
               const float* __restrict__ alibi, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
               T* __restrict__ O, float* __restrict__ L,
               int B, int H, int group, int Nq, int Nk, int d, int win_left, int win_right,
               long long q_sb, long long q_sh, long long q_sn,
               long long k_sb, long long k_sh, long long k_sn,
               long long v_sb, long long v_sh, long long v_sn,
               long long o_sb, long long o_sh, long long o_sn,
               long long l_sb, long long l_sh,
               float scale, float softcap)
{
    static_assert(NT % 32 == 0, "whole warps");
    constexpr int DK = D + 1;   // Kj rows padded: a warp reading column k of 32 rows hits 32 banks
    constexpr int BCP = BC + 1; // Sij rows padded likewise
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

    extern __shared__ float smem[];
    float* Qi = smem;                // [BR][D]
    float* Kj = Qi + BR * D;         // [BC][DK]
    float* Vj = Kj + BC * DK;        // [BC][D]
    float* Sij = Vj + BC * D;        // [BR][BCP], Pij overwrites it in place
    float* Oi = Sij + BR * BCP;      // [BR][D]
    float* mi = Oi + BR * D;         // [BR] running row max (log2 domain)
    float* li = mi + BR;             // [BR] running row sum
    float* alpha = li + BR;          // [BR] exp2(mi_old - mi_new) of the tile in hand

    const float neg_inf = __int_as_float(0xff800000);
    // Scores in the log2 domain: Q carries scale * log2(e); with score mods Q carries the scale
    // and score_mod (fa_mask.cuh) moves each modded score to the log2 domain.
    const float qscale = MASK == FA_MODS ? scale : scale * LOG2E;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = blockIdx.x * BR;

    // Grid-stride over (batch, head): gridDim.y/z are capped at 65535 by the planner.
    for (int b = blockIdx.z; b < B; b += gridDim.z)
    for (int h = blockIdx.y; h < H; h += gridDim.y) {
        const fa_seq sq = fa_seq::of(b, row0, Nq, Nk, cu_q, cu_k);
        if (sq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
        const int rows = min(BR, sq.rows), nk = sq.nk;
        const fa_window win = fa_window::of(sq, win_left, win_right);
        int j0 = 0, j1 = (nk + BC - 1) / BC;   // the key tiles some row of this tile sees
        if (MASK) win.tiles(row0, rows, BC, j0, j1);
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;
        const T* Qbh = Q + b * q_sb + h * q_sh + (sq.q0 + row0) * q_sn;
        const T* Kbh = K + b * k_sb + (h / group) * k_sh + sq.k0 * k_sn;   // GQA: group q heads a k/v head
        const T* Vbh = V + b * v_sb + (h / group) * v_sh + sq.k0 * v_sn;

        // Line 4: load Qi (pre-scaled), zero past the last row and past d.
        for (int idx = tid; idx < BR * D; idx += NT) {
            const int r = idx / D, c = idx % D;
            Qi[idx] = (r < rows && c < d) ? to_float(Qbh[r * q_sn + c]) * qscale : 0.f;
            Oi[idx] = 0.f;  // line 5
        }
        for (int r = tid; r < BR; r += NT) {
            mi[r] = neg_inf;
            li[r] = 0.f;
        }

        for (int j = j0; j < j1; ++j) {  // line 6
            const int col0 = j * BC;
            __syncthreads();  // the previous tile's Pij Vj is done with Kj, Vj, Sij
            // Line 7: load Kj, Vj, zero past the last key and past d.
            for (int idx = tid; idx < BC * D; idx += NT) {
                const int r = idx / D, c = idx % D;
                const bool in = col0 + r < nk && c < d;
                const long long key = col0 + r;
                Kj[r * DK + c] = in ? to_float(Kbh[key * k_sn + c]) : 0.f;
                Vj[r * D + c] = in ? to_float(Vbh[key * v_sn + c]) : 0.f;
            }
            __syncthreads();

            // Line 8: Sij = Qi Kj^T (log2 domain), score mods; keys out of range or window -inf.
            for (int idx = tid; idx < BR * BC; idx += NT) {
                const int r = idx / BC, c = idx % BC;
                float s = 0.f;
#pragma unroll 8
                for (int k = 0; k < D; ++k) s += Qi[r * D + k] * Kj[c * DK + k];
                const int key = col0 + c;
                if (MASK == FA_MODS) s = score_mod(s, 1.f, softcap, slope, win.diag(row0 + r) - key);
                const bool masked = key >= nk || (MASK && !win.sees(row0 + r, key));
                Sij[r * BCP + c] = masked ? neg_inf : s;
            }
            __syncthreads();

            // Line 9, one warp per row: mij = rowmax(Sij), mi_new = max(mi, mij),
            // Pij = exp2(Sij - mi_new), lij = rowsum(Pij), li = exp2(mi - mi_new) li + lij.
            for (int r = warp; r < BR; r += NT / 32) {
                float mij = neg_inf;
                for (int c = lane; c < BC; c += 32) mij = fmaxf(mij, Sij[r * BCP + c]);
                for (int o = 16; o > 0; o /= 2) mij = fmaxf(mij, __shfl_xor_sync(0xffffffffu, mij, o));
                const float mi_new = fmaxf(mi[r], mij);
                // Every key so far masked: subtract 0 so exp2(-inf) = 0 rather than NaN.
                const float base = mi_new == neg_inf ? 0.f : mi_new;
                float lij = 0.f;
                for (int c = lane; c < BC; c += 32) {
                    const float p = exp2f(Sij[r * BCP + c] - base);
                    Sij[r * BCP + c] = p;
                    lij += p;
                }
                for (int o = 16; o > 0; o /= 2) lij += __shfl_xor_sync(0xffffffffu, lij, o);
                __syncwarp();
                if (lane == 0) {
                    alpha[r] = exp2f(mi[r] - base);
                    li[r] = alpha[r] * li[r] + lij;
                    mi[r] = mi_new;
                }
            }
            __syncthreads();

            // Line 10: Oi = diag(alpha) Oi + Pij Vj.
            for (int idx = tid; idx < BR * D; idx += NT) {
                const int r = idx / D, c = idx % D;
                float acc = 0.f;
#pragma unroll 8
                for (int k = 0; k < BC; ++k) acc += Sij[r * BCP + k] * Vj[k * D + c];
                Oi[idx] = alpha[r] * Oi[idx] + acc;
            }
        }
        __syncthreads();

        // Lines 12-15: Oi / li and Li = mi + log(li) in natural log, written once.
        // A row with every key masked has li = 0: O = 0, L = -inf.
        T* Obh = O + b * o_sb + h * o_sh + (sq.q0 + row0) * o_sn;
        for (int idx = tid; idx < BR * D; idx += NT) {
            const int r = idx / D, c = idx % D;
            if (r < rows && c < d) {
                const float l = li[r];
                Obh[r * o_sn + c] = from_float<T>(l == 0.f ? 0.f : Oi[idx] / l);   // chosen, not 0 * NaN
            }
        }
        float* Lbh = L + b * l_sb + h * l_sh + sq.q0 + row0;
        for (int r = tid; r < rows; r += NT)
            Lbh[r] = li[r] == 0.f ? neg_inf : mi[r] * LN2 + logf(li[r]);   // a NaN row stays NaN
        __syncthreads();  // smem is reused by the next (batch, head)
    }
}
