// flash_fwd_fma.cu: FlashAttention-2 forward, Algorithm 1, on the CUDA cores with register tiles
// (any sm_75+; fp32 arithmetic whatever T is). flash_fwd_simt.cu, its readable twin, has every
// thread compute one element from shared memory (two shared loads an FMA); here, as in a GEMM's
// micro-kernel, each thread keeps a 4-row x CN-key tile of Sij and a 4-row x DN-column tile of Oi
// in registers and reads its operands as vectors, about one shared load per 8-16 FMAs.
//
// A block of (BR / 4) x 16 threads owns BR rows of Q; thread (ty, tx) holds rows 4 ty .. 4 ty + 3.
//   Sij = Qi Kj^T    keys CN tx .. CN tx + CN - 1 (CN = BC / 16): per k, Qi^T's 4 rows and Kj^T's
//                    CN keys as one vector each (both tiles k-major in shared memory);
//   softmax          a row's BC scores lie in the 16 threads of a half-warp: xor shuffles;
//   Pij              to shared memory, transposed (Pij^T: keys x rows);
//   Oi += Pij Vj     columns DN tx .. DN tx + DN - 1 (DN = D / 16): per key, Pij^T's 4 rows and
//                    Vj's DN columns as vectors.
// Qi carries scale * log2(e) (scores in the log2 domain, exp2f); with score mods it carries the
// scale and score_mod moves each score there (as flash_fwd_simt.cu). Masks, windows and varlen
// are fa_mask.cuh's; causal Q tiles run heaviest first (fa_block).
//
// Compile-time: T (float, fa_half, fa_bfloat16), the head-dim bound D (a multiple of 32; d <= D
// zero-padded), BR (32 or 64), BC (32 or 64), MASK. Shared memory, mirrored by
// planner.fma_smem_bytes, in floats: Qi^T [D][BR + 4], Kj^T [D][BC + 4], Vj [BC][D],
// Pij^T [BC][BR + 4] (rows padded to keep the transposing stores off a single bank).
#include "fa_dtypes.cuh"
#include "fa_mask.cuh"

// N floats (a multiple of 2; N / 4 16-byte or N / 2 8-byte loads) from 16- or 8-byte aligned p.
template <int N>
__device__ __forceinline__ void lds(float (&x)[N], const float* p) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) *reinterpret_cast<float4*>(x + i) = *reinterpret_cast<const float4*>(p + i);
    } else {
        static_assert(N % 2 == 0, "vectors of 2 or 4");
#pragma unroll
        for (int i = 0; i < N; i += 2) *reinterpret_cast<float2*>(x + i) = *reinterpret_cast<const float2*>(p + i);
    }
}

// acc[i][c] += sum over k < KN of A[k][i] B[k][c]: KN rank-1 updates from k-major shared tiles, a
// vector of 4 from A (rows AP floats apart) and of N from B (BP apart) a step: the micro-kernel
// of both products (Sij = Qi Kj^T over d, Oi += Pij Vj over the keys).
template <int KN, int N, int AP, int BP>
__device__ __forceinline__ void rank1_updates(float (&acc)[4][N], const float* A, const float* B) {
#pragma unroll 4
    for (int k = 0; k < KN; ++k) {
        float a[4], b[N];
        lds(a, A + k * AP);
        lds(b, B + k * BP);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < N; ++c) acc[i][c] = fmaf(a[i], b[c], acc[i][c]);
    }
}

// Rows [0, rows) of a strided tile of ROWS x D elements into a k-major shared tile t[D][ROWS + 4]
// (transposed), times `mul`; zeros past `rows` and past d. Consecutive threads take consecutive
// rows of one column: their shared stores are consecutive (one column's global reads are not, but
// each row's 32-byte sectors are read whole by the threads of the next columns, from L1).
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_transposed(float* t, const T* src, long long stride, int rows, int d, float mul) {
    for (int i = threadIdx.x; i < ROWS * D; i += NT) {
        const int r = i % ROWS, c = i / ROWS;
        t[c * (ROWS + 4) + r] = r < rows && c < d ? to_float(src[r * stride + c]) * mul : 0.f;
    }
}

template <typename T, int D, int BR, int BC, int MASK>
__global__ void __launch_bounds__(BR * 4, 2)   // two blocks an SM: at Br = 64, 128 registers a thread
flash_fwd_fma(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
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
    constexpr int NT = BR * 4, CN = BC / 16, DN = D / 16;   // threads; keys and O columns a thread
    constexpr int BRP = BR + 4, BCP = BC + 4;
    static_assert((BR == 32 || BR == 64) && (BC == 32 || BC == 64) && D % 32 == 0, "tiles");
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

    extern __shared__ __align__(16) float smem[];
    float* Qt = smem;             // [D][BRP]
    float* Kt = Qt + D * BRP;     // [D][BCP]
    float* Vs = Kt + D * BCP;     // [BC][D]
    float* Pt = Vs + BC * D;      // [BC][BRP]

    const float neg_inf = __int_as_float(0xff800000);
    const float qscale = MASK == FA_MODS ? scale : scale * LOG2E;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;   // a warp: two ty, 16 tx
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
        const T* Kbh = K + b * k_sb + (h / group) * k_sh + sq.k0 * k_sn;   // GQA: group q heads a k/v head
        const T* Vbh = V + b * v_sb + (h / group) * v_sh + sq.k0 * v_sn;

        __syncthreads();   // the previous (batch, head) is done with Qi^T
        // Line 4: Qi^T, pre-scaled. Line 5: Oi = 0, mi = -inf, li = 0 (this thread's rows).
        load_transposed<T, BR, D, NT>(Qt, Q + b * q_sb + h * q_sh + (sq.q0 + row0) * q_sn, q_sn, rows, d, qscale);
        float o[4][DN] = {}, m[4], l[4] = {};
#pragma unroll
        for (int i = 0; i < 4; ++i) m[i] = neg_inf;

        for (int j = j0; j < j1; ++j) {   // line 6
            const int col0 = j * BC;
            __syncthreads();   // the previous tile's Pij Vj is done with Kj^T, Vj, Pij^T
            // Line 7: Kj^T and Vj; zeros past the last key and past d.
            load_transposed<T, BC, D, NT>(Kt, Kbh + col0 * k_sn, k_sn, nk - col0, d, 1.f);
            for (int i = threadIdx.x; i < BC * D; i += NT) {
                const int r = i / D, c = i % D;
                Vs[i] = col0 + r < nk && c < d ? to_float(Vbh[(long long)(col0 + r) * v_sn + c]) : 0.f;
            }
            __syncthreads();

            // Line 8: Sij = Qi Kj^T, a 4 x CN tile a thread.
            float s[4][CN] = {};
            rank1_updates<D, CN, BRP, BCP>(s, Qt + 4 * ty, Kt + CN * tx);
            // Score mods on every score; on edge tiles (keys past nk, rows the window cuts) the mask.
            const bool edge = col0 + BC > nk || (MASK && !win.covers(row0, BR, col0, BC));
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < CN; ++c) {
                    const int row = row0 + 4 * ty + i, key = col0 + CN * tx + c;
                    if (MASK == FA_MODS) s[i][c] = score_mod(s[i][c], 1.f, softcap, slope, win.diag(row) - key);
                    if (edge && (key >= nk || (MASK && !win.sees(row, key)))) s[i][c] = neg_inf;
                }

            // Line 9 per row, across the row's 16 threads: mi_new = max(mi, rowmax), Pij =
            // exp2(Sij - mi_new), li = exp2(mi - mi_new) li + rowsum; line 10's diag(alpha) Oi.
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float mx = s[i][0];
#pragma unroll
                for (int c = 1; c < CN; ++c) mx = fmaxf(mx, s[i][c]);
#pragma unroll
                for (int x = 1; x < 16; x *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
                const float m_new = fmaxf(m[i], mx);
                const float base = m_new == neg_inf ? 0.f : m_new;   // all masked so far: no NaN
                float sum = 0.f;
#pragma unroll
                for (int c = 0; c < CN; ++c) {
                    s[i][c] = exp2f(s[i][c] - base);
                    sum += s[i][c];
                }
#pragma unroll
                for (int x = 1; x < 16; x *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, x);
                const float alpha = exp2f(m[i] - base);
                l[i] = alpha * l[i] + sum;
                m[i] = m_new;
#pragma unroll
                for (int c = 0; c < DN; ++c) o[i][c] *= alpha;
            }
            // Pij^T: each of this thread's keys, its 4 rows as one vector.
#pragma unroll
            for (int c = 0; c < CN; ++c)
                *reinterpret_cast<float4*>(Pt + (CN * tx + c) * BRP + 4 * ty) = make_float4(s[0][c], s[1][c], s[2][c], s[3][c]);
            __syncthreads();

            // Line 10: Oi += Pij Vj, a 4 x DN tile a thread.
            rank1_updates<BC, DN, BRP, D>(o, Pt + 4 * ty, Vs + DN * tx);
        }

        // Lines 12-15: Oi / li, and Li = mi ln 2 + ln li; a row with every key masked has li = 0:
        // O = 0 and L = -inf (chosen, not 0 * NaN).
        T* Obh = O + b * o_sb + h * o_sh + (sq.q0 + row0) * o_sn;
        float* Lbh = L + b * l_sb + h * l_sh + sq.q0 + row0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = 4 * ty + i;
            if (r >= rows) continue;
            const float inv = l[i] == 0.f ? 0.f : 1.f / l[i];
#pragma unroll
            for (int c = 0; c < DN; ++c)
                if (DN * tx + c < d) Obh[r * o_sn + DN * tx + c] = from_float<T>(l[i] == 0.f ? 0.f : o[i][c] * inv);
            if (tx == 0) Lbh[r] = l[i] == 0.f ? neg_inf : m[i] * LN2 + logf(l[i]);
        }
    }
}
