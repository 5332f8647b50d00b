// flash_fwd_fma.cu: FlashAttention-2 forward, Algorithm 1, on the CUDA cores with register tiles
// (sm_80+, float32). flash_fwd_simt.cu, its readable twin, has every thread compute one element
// from shared memory (two shared loads an FMA); here, as in a GEMM's micro-kernel, each thread
// keeps an RM-row x CN-key tile of Sij and an RM-row x DN-column tile of Oi in registers and
// reads its operands as vectors: 8 rows x 4 keys is 32 FMAs for three 16-byte shared loads.
//
// A block of (BR / RM) x 16 threads owns BR rows of Q; thread (ty, tx) holds rows RM ty .. RM ty + RM - 1.
//   Sij = Qi Kj^T    keys CN tx .. CN tx + CN - 1 (CN = BC / 16): per k, Qi^T's RM rows and Kj^T's
//                    CN keys as vectors (both tiles k-major in shared memory);
//   softmax          a row's BC scores lie in the 16 threads of a half-warp: xor shuffles;
//   Pij              to shared memory, transposed (Pij^T: keys x rows);
//   Oi += Pij Vj     DN = D / 16 columns, as vectors of CV (4, or 2 where DN is not a multiple of
//                    4) 16 CV apart, so 16 threads' loads are contiguous: per key, Pij^T's RM rows
//                    and Vj's DN columns.
// Tiles arrive by cp.async, 4 bytes a copy (which transposes Qi and Kj on the way and reads any
// stride), and each under the other product: Vj while Sij is computed, Kj+1 while Pij Vj is;
// two barriers a tile. Scores are scaled after the product (scale * log2(e): the log2 domain,
// exp2f); with score mods score_mod scales them (as flash_fwd_simt.cu). Masks, windows and
// varlen are fa_mask.cuh's; causal Q tiles run heaviest first (fa_block).
//
// Compile-time: the head-dim bound D (a multiple of 32; d <= D zero-padded), BR (32 to 128), BC
// (32 or 64), RM (4 or 8), MASK. Shared memory, mirrored by planner.fma_smem_bytes, in floats:
// Qi^T [D][BR + 4] and Kj^T [D][BC + 4] (a copy's 8 columns 4 banks apart, its 4 rows 1 apart),
// Vj [BC][D + 8] (its 4 rows 8 banks apart, its 8 columns 1 apart): either way a warp's 4 x 8
// copy lands in 32 banks; Pij^T [BC][BR] (16-byte slots swizzled by the writer's tx: its stores
// hit 32 banks too).
#include "fa_async.cuh"
#include "fa_mask.cuh"

// N floats (a multiple of 2; N / 4 16-byte or N / 2 8-byte loads) from 16- or 8-byte aligned p.
template <int N>
__device__ __forceinline__ void lds(float* x, const float* p) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) *reinterpret_cast<float4*>(x + i) = *reinterpret_cast<const float4*>(p + i);
    } else {
        static_assert(N % 2 == 0, "vectors of 2 or 4");
#pragma unroll
        for (int i = 0; i < N; i += 2) *reinterpret_cast<float2*>(x + i) = *reinterpret_cast<const float2*>(p + i);
    }
}

// Rows [0, rows) and columns [0, d) of a strided ROWS x D tile into shared memory (zeros past
// rows and d): transposed into t[D][ROWS + 4], or as it is into t[ROWS][D + 8]. A warp copies 4
// rows x 8 columns an instruction: 32-byte pieces of 4 rows in global memory, 32 banks in shared
// memory (the paddings). A thread keeps one row of global memory, the 8-column steps are
// immediate offsets.
template <bool TRANSPOSE, int ROWS, int D, int NT>
__device__ __forceinline__ void copy_tile(float* t, const float* src, long long stride, int rows, int d) {
    static_assert(ROWS % 4 == 0 && D % 8 == 0, "whole patches");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int p = warp; p < ROWS / 4; p += NT / 32) {
        const int r = 4 * p + lane / 8;
        const float* row = src + (r < rows ? r : 0) * stride + lane % 8;
        unsigned dst = smem_addr(TRANSPOSE ? t + (lane % 8) * (ROWS + 4) + r : t + r * (D + 8) + lane % 8);
        fa_opaque(dst);
#pragma unroll
        for (int c = 0; c < D; c += 8)
            cp_async_4(dst + 4 * (TRANSPOSE ? c * (ROWS + 4) : c), row + c, r < rows && c + lane % 8 < d);
    }
}

// Pij^T's 16-byte slot for rows 4 slot .. 4 slot + 3 of key `key`: XOR-swizzled by the tx that
// wrote it (key / CN), so a warp's stores of one key index spread over all banks.
template <int CN>
__device__ __forceinline__ int p_slot(int key, int slot) { return slot ^ ((key / CN) & 7); }

// Blocks an SM for the register budget: as many as an H100's 228 KB of shared memory hold (1 KB of
// it each block's), but at most as many as leave 128 registers a thread.
template <int D, int BR, int BC, int NT>
__host__ __device__ constexpr int fma_blocks() {
    constexpr int fit = 228 * 1024 / (4 * (D * (BR + 4) + D * (BC + 4) + BC * (D + 8) + BC * BR) + 1024);
    constexpr int regs = 65536 / (NT * 128);
    return fit < 1 ? 1 : fit < regs ? fit : regs;
}

template <int D, int BR, int BC, int RM, int MASK>
__global__ void __launch_bounds__(BR / RM * 16, fma_blocks<D, BR, BC, BR / RM * 16>())
flash_fwd_fma(const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ V,
              const float* __restrict__ alibi, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
              float* __restrict__ O, float* __restrict__ L,
              int B, int H, int group, int Nq, int Nk, int d, int win_left, int win_right,
              long long q_sb, long long q_sh, long long q_sn,
              long long k_sb, long long k_sh, long long k_sn,
              long long v_sb, long long v_sh, long long v_sn,
              long long o_sb, long long o_sh, long long o_sn,
              long long l_sb, long long l_sh,
              float scale, float softcap)
{
    constexpr int NT = BR / RM * 16, CN = BC / 16, DN = D / 16;   // threads; keys and O columns a thread
    constexpr int CV = DN % 4 == 0 ? 4 : 2, BRP = BR + 4, BCP = BC + 4;
    static_assert((RM == 4 || RM == 8) && BR % 32 == 0 && BR <= 128 && (BC == 32 || BC == 64) && D % 32 == 0,
                  "tiles");
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

    extern __shared__ __align__(16) float smem[];
    float* Qt = smem;             // [D][BRP]
    float* Kt = Qt + D * BRP;     // [D][BCP]
    float* Vs = Kt + D * BCP;     // [BC][D + 8]
    float* Pt = Vs + BC * (D + 8);   // [BC][BR], swizzled

    const float neg_inf = __int_as_float(0xff800000);
    const float sscale = MASK == FA_MODS ? 1.f : scale * LOG2E;   // score_mod applies scale itself
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;       // a warp: 2 ty, 16 tx
    const fa_block blk = fa_block::of<MASK>();   // causal: heaviest Q tiles first
    const int row0 = blk.tile * BR;

    for (int b = blk.b; b < B; b += gridDim.z)
    for (int h = blk.h; h < H; h += gridDim.y) {
        const fa_tile<MASK> tq = fa_tile<MASK>::of(b, row0, BR, BC, Nq, Nk, cu_q, cu_k, win_left, win_right);
        if (tq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
        const fa_seq& sq = tq.sq;
        const fa_window& win = tq.win;
        const int rows = tq.rows, nk = sq.nk, j0 = tq.j0, j1 = tq.j1;   // j0, j1: the key tiles some row sees
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;
        const float* Kbh = K + b * k_sb + (h / group) * k_sh + sq.k0 * k_sn;   // GQA: group q heads a k/v head
        const float* Vbh = V + b * v_sb + (h / group) * v_sh + sq.k0 * v_sn;

        __syncthreads();   // the previous (batch, head) is done with every tile
        // Line 4: Qi^T; line 7's first Kj^T with it. Line 5: Oi = 0, mi = -inf, li = 0 (this thread's rows).
        copy_tile<true, BR, D, NT>(Qt, Q + b * q_sb + h * q_sh + (sq.q0 + row0) * q_sn, q_sn, rows, d);
        if (j0 < j1) copy_tile<true, BC, D, NT>(Kt, Kbh + (long long)j0 * BC * k_sn, k_sn, nk - j0 * BC, d);
        cp_async_commit();
        float o[RM][DN] = {}, m[RM], l[RM] = {};
#pragma unroll
        for (int i = 0; i < RM; ++i) m[i] = neg_inf;

        for (int j = j0; j < j1; ++j) {   // line 6
            const int col0 = j * BC;
            cp_async_wait_all();
            __syncthreads();   // Kj^T (and Qi^T) landed; the previous Pij Vj is done with Vj and Pij^T
            // Line 7's Vj, under line 8.
            copy_tile<false, BC, D, NT>(Vs, Vbh + (long long)col0 * v_sn, v_sn, nk - col0, d);
            cp_async_commit();

            // Line 8: Sij = Qi Kj^T, an RM x CN tile a thread: per k a rank-1 update.
            float s[RM][CN] = {};
#pragma unroll 4
            for (int k = 0; k < D; ++k) {
                float a[RM], c[CN];
                lds<RM>(a, Qt + k * BRP + RM * ty);
                lds<CN>(c, Kt + k * BCP + CN * tx);
#pragma unroll
                for (int i = 0; i < RM; ++i)
#pragma unroll
                    for (int n = 0; n < CN; ++n) s[i][n] = fmaf(a[i], c[n], s[i][n]);
            }
            // Scaled, or score-modded; on edge tiles (keys past nk, rows the window cuts) the mask.
            const bool edge = col0 + BC > nk || (MASK && !win.covers(row0, BR, col0, BC));
#pragma unroll
            for (int i = 0; i < RM; ++i)
#pragma unroll
                for (int n = 0; n < CN; ++n) {
                    const int row = row0 + RM * ty + i, key = col0 + CN * tx + n;
                    s[i][n] = MASK == FA_MODS ? score_mod(s[i][n], scale, softcap, slope, win.diag(row) - key)
                                              : s[i][n] * sscale;
                    if (edge && (key >= nk || (MASK && !win.sees(row, key)))) s[i][n] = neg_inf;
                }

            // Line 9 per row, the max across the row's 16 threads: mi_new = max(mi, rowmax), Pij =
            // exp2(Sij - mi_new), li = exp2(mi - mi_new) li + rowsum, each thread's li over its own
            // keys (summed across the 16 at the end: alpha is the row's); line 10's diag(alpha) Oi.
#pragma unroll
            for (int i = 0; i < RM; ++i) {
                float mx = s[i][0];
#pragma unroll
                for (int n = 1; n < CN; ++n) mx = fmaxf(mx, s[i][n]);
#pragma unroll
                for (int x = 1; x < 16; x *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
                const float m_new = fmaxf(m[i], mx);
                const float base = m_new == neg_inf ? 0.f : m_new;   // all masked so far: no NaN
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < CN; ++n) {
                    s[i][n] = exp2f(s[i][n] - base);
                    sum += s[i][n];
                }
                const float alpha = exp2f(m[i] - base);
                l[i] = alpha * l[i] + sum;
                m[i] = m_new;
#pragma unroll
                for (int c = 0; c < DN; ++c) o[i][c] *= alpha;
            }
            // Pij^T: each of this thread's keys, its RM rows as RM / 4 vectors.
#pragma unroll
            for (int n = 0; n < CN; ++n)
#pragma unroll
                for (int q = 0; q < RM / 4; ++q) {
                    const int key = CN * tx + n;
                    *reinterpret_cast<float4*>(Pt + key * BR + 4 * p_slot<CN>(key, RM / 4 * ty + q)) =
                        make_float4(s[4 * q][n], s[4 * q + 1][n], s[4 * q + 2][n], s[4 * q + 3][n]);
                }
            cp_async_wait_all();
            __syncthreads();   // Pij^T and Vj landed; Sij is done with Kj^T
            // Line 7's next Kj^T, under line 10.
            if (j + 1 < j1) copy_tile<true, BC, D, NT>(Kt, Kbh + (long long)(col0 + BC) * k_sn, k_sn, nk - col0 - BC, d);
            cp_async_commit();

            // Line 10: Oi += Pij Vj, an RM x DN tile a thread: per key a rank-1 update, the keys in
            // groups of CN (those one tx wrote: one swizzle a group).
#pragma unroll 1
            for (int kg = 0; kg < 16; ++kg) {
                const float* Pg = Pt + kg * CN * BR;
                int slot[RM / 4];
#pragma unroll
                for (int q = 0; q < RM / 4; ++q) slot[q] = 4 * p_slot<CN>(kg * CN, RM / 4 * ty + q);
#pragma unroll
                for (int n = 0; n < CN; ++n) {
                    float a[RM], c[DN];
#pragma unroll
                    for (int q = 0; q < RM / 4; ++q) lds<4>(a + 4 * q, Pg + n * BR + slot[q]);
#pragma unroll
                    for (int v = 0; v < DN / CV; ++v)
                        lds<CV>(c + CV * v, Vs + (kg * CN + n) * (D + 8) + 16 * CV * v + CV * tx);
#pragma unroll
                    for (int i = 0; i < RM; ++i)
#pragma unroll
                        for (int m2 = 0; m2 < DN; ++m2) o[i][m2] = fmaf(a[i], c[m2], o[i][m2]);
                }
            }
        }
        cp_async_wait_all();   // nothing in flight into the tiles the next (batch, head) copies

        // Lines 12-15: Oi / li, and Li = mi ln 2 + ln li; a row with every key masked has li = 0:
        // O = 0 and L = -inf (chosen, not 0 * NaN).
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int x = 1; x < 16; x *= 2) l[i] += __shfl_xor_sync(0xffffffffu, l[i], x);
        float* Obh = O + b * o_sb + h * o_sh + (sq.q0 + row0) * o_sn;
        float* Lbh = L + b * l_sb + h * l_sh + sq.q0 + row0;
#pragma unroll
        for (int i = 0; i < RM; ++i) {
            const int r = RM * ty + i;
            if (r >= rows) continue;
            const float inv = l[i] == 0.f ? 0.f : 1.f / l[i];
#pragma unroll
            for (int n = 0; n < DN; ++n) {
                const int col = n / CV * 16 * CV + CV * tx + n % CV;
                if (col < d) Obh[r * o_sn + col] = l[i] == 0.f ? 0.f : o[i][n] * inv;
            }
            if (tx == 0) Lbh[r] = l[i] == 0.f ? neg_inf : m[i] * LN2 + logf(l[i]);
        }
    }
}
