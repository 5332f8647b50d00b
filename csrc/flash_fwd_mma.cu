// flash_fwd_mma.cu: FlashAttention-2 forward, Algorithm 1, on the tensor cores (fp16/bf16 in,
// fp32 accumulation, O in the input type, L in fp32).
//
// FA2's work partition: a block owns a Q tile of BR = 16 * MT * NW rows, each of its NW warps
// owns MT m-tiles of 16 of those rows (two m-tiles share every Kj/Vj fragment read from shared
// memory, halving that traffic per flop). Qi stays in shared memory for the sweep. Sij and
// Oi live in mma accumulators (registers); Pij goes from the Sij accumulators straight into the
// A operand of Pij Vj, never through shared memory. Row statistics (mi, li) are per thread: a
// thread holds rows g and g + 8 of its warp's 16, and the 4 threads of a quad share a row.
// Shared memory holds Qi (then, per warp, the output on its way out), Kj and Vj, rows padded by 16 bytes so ldmatrix's 8 row addresses fall in 8 distinct bank
// groups for any D (a multiple of 16): no bank conflicts, no swizzle arithmetic.
// Loads overlap compute as in FA2: Vj streams in while Sij = Qi Kj^T is computed, and K(j+1)
// while Pij Vj is. The row max is taken on raw scores and the scale (times log2 e) folds into
// the exponent's FMA: exp2(s * sl2 - mi * sl2), the SFU's ex2. That needs sl2 > 0: a negative
// scale flips the sign of Qi once in shared memory instead (exact), and a zero scale becomes
// FLT_MIN, for which every finite score gives exp2(±tiny) = 1 exactly, as with scale 0.
//
// Compile-time: T (fa_half, fa_bfloat16), the head-dim bound D (d <= D, zero-padded), warps
// NW, m-tiles per warp MT, key tile BC, CAUSAL, and ARCH (fa_mma.cuh: 80 = m16n8k16 + cp.async, 75 = Turing).
// Per call: sizes, element strides of Q, K, V, O (last dim contiguous), scale. The planner
// (flashattn_cupy/planner.py, mma_smem_bytes) mirrors the shared-memory layout below.
#include "fa_mma.cuh"

struct alignas(16) fa_u128 { unsigned x, y, z, w; };

__device__ __forceinline__ bool vec_ok(const void* p, long long sb, long long sh, long long sn, int d) {
    // 16-byte loads need every row start 16-byte aligned: base, strides and d multiples of 8.
    return (reinterpret_cast<unsigned long long>(p) & 15) == 0 && sb % 8 == 0 && sh % 8 == 0 &&
           sn % 8 == 0 && d % 8 == 0;
}

// Rows [0, ROWS) x columns [0, D) of a tile into shared memory (row pitch D + 8); rows past
// `rows` and columns past d become zeros. 16-byte chunks when `vec`, elements otherwise.
template <typename T, int ROWS, int D, int NT, int ARCH>
__device__ __forceinline__ void load_tile(unsigned short* dst, const T* src, long long stride,
                                          int rows, int d, bool vec) {
    constexpr int DP = D + 8, CH = D / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
        const int r = i / CH, c = (i % CH) * 8;
        unsigned short* s = dst + r * DP + c;
        const bool in = r < rows && c < d;
        const T* g = src + (in ? r * stride + c : 0);
        if (vec) {
            if constexpr (ARCH >= 80) {
                cp_async_16(s, g, in ? 16 : 0);
            } else {
                const fa_u128 zero = {0u, 0u, 0u, 0u};
                *reinterpret_cast<fa_u128*>(s) = in ? *reinterpret_cast<const fa_u128*>(g) : zero;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) s[e] = (in && c + e < d) ? g[e].bits : 0;
        }
    }
}

template <typename T, int D, int NW, int MT, int BC, bool CAUSAL, int ARCH>
__global__ void __launch_bounds__(NW * 32)
flash_fwd_mma(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
              T* __restrict__ O, float* __restrict__ L,
              int B, int H, int Nq, int Nk, int d,
              long long q_sb, long long q_sh, long long q_sn,
              long long k_sb, long long k_sh, long long k_sn,
              long long v_sb, long long v_sh, long long v_sn,
              long long o_sb, long long o_sh, long long o_sn,
              float scale)
{
    constexpr int WR = 16 * MT, BR = WR * NW, NT = 32 * NW, DP = D + 8;   // WR: rows per warp
    constexpr int KS = D / 16;   // k-steps of Qi Kj^T
    constexpr int NS = BC / 8;   // 8-key column tiles of Sij
    constexpr int ND = D / 8;    // 8-wide column tiles of Oi
    // Qi fragments stay in shared memory: holding them in registers (D = 64) cost 50 more
    // registers a thread and 10% of the speed on an H100, for 20% fewer ldmatrix.
    constexpr bool QREG = false;
    static_assert(D % 16 == 0 && BC % 16 == 0, "MMA tiles are 16 wide");
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* Qs = smem;            // [BR][DP]
    unsigned short* Ks = Qs + BR * DP;    // [BC][DP]
    unsigned short* Vs = Ks + BC * DP;    // [BC][DP]

    const float neg_inf = __int_as_float(0xff800000);
    const float sl2 = fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    // Causal: later Q tiles see more keys; launch them first so the tail is short.
    const int tile = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int row0 = tile * BR, rows = min(BR, Nq - row0);
    const int shift = Nk - Nq;   // causal: query i sees keys j <= i + shift
    int Tc = (Nk + BC - 1) / BC;
    if (CAUSAL) {
        const long long last_key = (long long)row0 + rows - 1 + shift;
        Tc = last_key < 0 ? 0 : min(Tc, (int)(last_key / BC) + 1);
    }
    const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
    const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d), o_vec = vec_ok(O, o_sb, o_sh, o_sn, d);
    // This lane's ldmatrix row addresses (bytes, shared space) for the A operand from Qi, the
    // B operand from Kj (rows are keys) and from Vj (transposed: rows are keys, B wants d).
    const unsigned q_lane = smem_addr(Qs) + 2 * ((warp * WR + lane % 16) * DP + lane / 16 * 8);
    const unsigned k_lane = smem_addr(Ks) + 2 * ((lane % 8 + lane / 16 * 8) * DP + lane / 8 % 2 * 8);
    const unsigned v_lane = smem_addr(Vs) + 2 * ((lane % 8 + lane / 8 % 2 * 8) * DP + lane / 16 * 8);

    // Grid-stride over (batch, head): gridDim.y/z are capped at 65535 by the planner.
    for (int b = blockIdx.z; b < B; b += gridDim.z)
    for (int h = blockIdx.y; h < H; h += gridDim.y) {
        const T* Qbh = Q + b * q_sb + h * q_sh + row0 * q_sn;
        const T* Kbh = K + b * k_sb + h * k_sh;
        const T* Vbh = V + b * v_sb + h * v_sh;

        // Line 4: Qi, and K0 behind it.
        load_tile<T, BR, D, NT, ARCH>(Qs, Qbh, q_sn, rows, d, q_vec);
        if (Tc > 0) load_tile<T, BC, D, NT, ARCH>(Ks, Kbh, k_sn, Nk, d, k_vec);
        if constexpr (ARCH >= 80) { cp_async_commit(); cp_async_wait_all(); }
        __syncthreads();
        if (scale < 0.f) {   // s * scale = (-s) * |scale|: negate Qi (sign bits) once
            for (int i = threadIdx.x; i < BR * DP / 2; i += NT) reinterpret_cast<unsigned*>(Qs)[i] ^= 0x80008000u;
            __syncthreads();
        }

        unsigned qf[QREG ? KS : 1][MT][4];   // Qi as A fragments: all of them, or one k-step's
        if constexpr (QREG)
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4<false>(qf[kk][mt], q_lane + 2 * (mt * 16 * DP + kk * 16));

        float o[MT][ND][4] = {};                      // line 5: Oi = 0, mi = -inf, li = 0
        float m[MT][2], l[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = neg_inf, l[mt][0] = l[mt][1] = 0.f;

        for (int j = 0; j < Tc; ++j) {   // line 6
            const int col0 = j * BC;
            if constexpr (ARCH >= 80) cp_async_wait_all();
            __syncthreads();   // Kj has landed; every warp is done with V(j-1)
            // Line 7 (V half): Vj streams in during Sij = Qi Kj^T.
            load_tile<T, BC, D, NT, ARCH>(Vs, Vbh + col0 * v_sn, v_sn, Nk - col0, d, v_vec);
            if constexpr (ARCH >= 80) cp_async_commit();

            // Line 8: Sij = Qi Kj^T (Qi fragments from shared memory, both m-tiles per Kj fragment).
            float s[MT][NS][4] = {};
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                if constexpr (!QREG)
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4<false>(qf[0][mt], q_lane + 2 * (mt * 16 * DP + kk * 16));
                const auto& qa = qf[QREG ? kk : 0];
#pragma unroll
                for (int p = 0; p < NS / 2; ++p) {
                    unsigned kb[4];
                    ldmatrix_x4<false>(kb, k_lane + 2 * (p * 16 * DP + kk * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16x8x16<T, ARCH>(s[mt][2 * p], qa[mt], kb[0], kb[1]);
                        mma_16x8x16<T, ARCH>(s[mt][2 * p + 1], qa[mt], kb[2], kb[3]);
                    }
                }
            }
            // Edge tiles only: keys past Nk or past this warp's diagonal -> -inf.
            if (col0 + BC > Nk || (CAUSAL && col0 + BC - 1 > row0 + warp * WR + shift)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = col0 + nt * 8 + 2 * t + e % 2;
                        const int row = row0 + warp * WR + mt * 16 + g + e / 2 * 8;
                        if (key >= Nk || (CAUSAL && key > row + shift)) s[mt][nt][e] = neg_inf;
                    }
            }

            if constexpr (ARCH >= 80) cp_async_wait_all();
            __syncthreads();   // Vj has landed; every warp is done with Kj
            if (j + 1 < Tc) {  // line 7 (K half) of the next step, during Pij Vj
                load_tile<T, BC, D, NT, ARCH>(Ks, Kbh + (col0 + BC) * k_sn, k_sn, Nk - col0 - BC, d, k_vec);
                if constexpr (ARCH >= 80) cp_async_commit();
            }

            // Line 9 (mi in the log2 domain, mi = sl2 * max): mi_new = max(mi, sl2 rowmax Sij),
            // Pij = exp2(sl2 Sij - mi_new), li = exp2(mi - mi_new) li + rowsum Pij.
            float alpha[MT][2];
            bool moved = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = neg_inf;
#pragma unroll
                for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[mt][r], mx * sl2);
                const float base = m_new == neg_inf ? 0.f : m_new;   // all masked so far: no NaN
                alpha[mt][r] = fast_exp2(m[mt][r] - base);           // exactly 1 if the max stayed
                moved |= m_new != m[mt][r];
                float rowsum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        s[mt][nt][e] = fast_exp2(fmaf(s[mt][nt][e], sl2, -base));
                        rowsum += s[mt][nt][e];
                    }
                l[mt][r] = alpha[mt][r] * l[mt][r] + rowsum;   // this thread's share; the quad adds up at the end
                m[mt][r] = m_new;
            }
            // Line 10's diag(alpha) Oi, skipped (exactly) when no row max of the warp moved:
            // past the first tiles it rarely does.
            if (__any_sync(0xffffffffu, moved))
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int dt = 0; dt < ND; ++dt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) o[mt][dt][e] *= alpha[mt][e / 2];

            // Line 10: Oi += Pij Vj, Pij rounded to T as the A operand (accumulators -> A fragments).
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                unsigned pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = pack2<T, ARCH>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = pack2<T, ARCH>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = pack2<T, ARCH>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = pack2<T, ARCH>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int p = 0; p < D / 16; ++p) {
                    unsigned vb[4];
                    ldmatrix_x4<true>(vb, v_lane + 2 * (kk * 16 * DP + p * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16x8x16<T, ARCH>(o[mt][2 * p], pa[mt], vb[0], vb[1]);
                        mma_16x8x16<T, ARCH>(o[mt][2 * p + 1], pa[mt], vb[2], vb[3]);
                    }
                }
            }
        }

        // Lines 12-15: Oi / li, Li = mi + log(li) (natural log). A row with every key masked
        // has li = 0: O = 0, L = -inf. O goes out through this warp's own rows of Qs (Qi is in
        // registers), so the global stores are whole 16-byte rows.
        unsigned short* Ow = Qs + warp * WR * DP;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
            l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
            const float inv = l[mt][r] > 0.f ? 1.f / l[mt][r] : 0.f;
#pragma unroll
            for (int dt = 0; dt < ND; ++dt)
                *reinterpret_cast<unsigned*>(Ow + (mt * 16 + g + 8 * r) * DP + dt * 8 + 2 * t) =
                    pack2<T, ARCH>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
        }
        __syncwarp();
        T* Obh = O + b * o_sb + h * o_sh + row0 * o_sn;
        for (int i = lane; i < WR * ND; i += 32) {
            const int r = warp * WR + i / ND, c = i % ND * 8;
            if (r >= rows || c >= d) continue;
            const unsigned short* src = Ow + (i / ND) * DP + c;
            T* dst = Obh + r * o_sn + c;
            if (o_vec) {
                *reinterpret_cast<fa_u128*>(dst) = *reinterpret_cast<const fa_u128*>(src);
            } else {
                for (int e = 0; e < 8 && c + e < d; ++e) dst[e].bits = src[e];
            }
        }
        if (t == 0) {
            float* Lbh = L + ((long long)b * H + h) * Nq + row0;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = warp * WR + mt * 16 + g + 8 * r;
                if (row < rows) Lbh[row] = l[mt][r] > 0.f ? m[mt][r] * LN2 + logf(l[mt][r]) : neg_inf;
            }
        }
        __syncthreads();   // smem is reused by the next (batch, head)
    }
}
