// flash_fwd_mma.cu: FlashAttention-2 forward, Algorithm 1, on the tensor cores, with fp32
// accumulation, O in the input type and L in fp32. Inputs: fp16/bf16 (mma m16n8k16; m16n8k8 on
// Turing), or fp32 as TF32 (m16n8k8, PASSES = 1, an opt-in) or as 3xTF32 (PASSES = 3: each
// operand split into a TF32 value and a remainder, three MMAs, about fp32's accuracy).
//
// FA2's work partition: a block owns a Q tile of BR = 16 * MT * NW rows, each of its NW warps
// owns MT m-tiles of 16 of those rows (two m-tiles share every Kj/Vj fragment read from shared
// memory, halving that traffic per flop). Qi stays in shared memory for the sweep. Sij and
// Oi live in mma accumulators (registers); Pij goes from the Sij accumulators straight into the
// A operand of Pij Vj, never through shared memory. Row statistics (mi, li) are per thread: a
// thread holds rows g and g + 8 of each of its warp's m-tiles; the 4 threads of a quad share a
// row. Shared memory holds Qi (then, per warp, the output on its way out), Kj and Vj, rows
// padded by 16 bytes so ldmatrix's 8 row addresses fall in 8 distinct bank groups for any D:
// no bank conflicts, no swizzle arithmetic.
// Loads overlap compute as in FA2: Vj streams in while Sij = Qi Kj^T is computed, and K(j+1)
// while Pij Vj is. The row max is taken on raw scores and the scale (times log2 e) folds into
// the exponent's FMA: exp2(s * sl2 - mi), the SFU's ex2. That needs sl2 > 0: a negative scale
// flips the sign of Qi once in shared memory instead (exact), and a zero scale becomes FLT_MIN,
// for which every finite score gives exp2(±tiny) = 1 exactly, as with scale 0.
//
// Compile-time: T (fa_half, fa_bfloat16, float), the head-dim bound D (d <= D, zero-padded),
// warps NW, m-tiles per warp MT, key tile BC, MASK (fa_mask.cuh: none, window, window + score
// mods), ARCH (fa_mma.cuh: 80 = sm_80 instructions with cp.async, 75 = Turing's) and PASSES
// (1, or 3 for 3xTF32). Per call (fa_mask.cuh): the ALiBi slopes and varlen offsets, sizes,
// window, element strides, scale and softcap. The planner (flashattn_cupy/planner.py,
// mma_smem_bytes) mirrors the shared-memory layout below.
#include "fa_softmax.cuh"

template <typename T, int D, int NW, int MT, int BC, int MASK, int ARCH, int PASSES>
__global__ void __launch_bounds__(NW * 32)
flash_fwd_mma(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
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
    using E = fa_elem<T>;
    constexpr bool F32 = sizeof(T) == 4;
    constexpr int WR = 16 * MT, BR = WR * NW, NT = 32 * NW;   // WR: rows per warp
    constexpr int DP = D + E::VEC, ROW = DP * sizeof(T);      // smem row pitch: elements, bytes
    constexpr int KS = D * sizeof(T) / 32;   // k-steps of Qi Kj^T (32 bytes: 16 halves, 8 floats)
    constexpr int NS = BC / 8;   // 8-key column tiles of Sij
    constexpr int ND = D / 8;    // 8-wide column tiles of Oi
    static_assert(PASSES == 1 || (PASSES == 3 && F32), "3 passes split fp32 into TF32 pairs");
    // 3xTF32 sums tensor-core products in fresh accumulators (see their use below): scores KG
    // k-steps at a time, Pij Vj DCH column tiles at a time (at most 64 registers, 32 past D = 64).
    constexpr int KG = PASSES == 3 ? 2 : KS;
    constexpr int PV_REGS = PASSES == 1 ? MT * ND * 4 : (D <= 64 ? 64 : 32);
    constexpr int DCH = MT * ND * 4 <= PV_REGS ? ND : PV_REGS / (MT * 4);
    static_assert(D % 16 == 0 && BC % 16 == 0, "MMA tiles are 16 wide");
    static_assert(!F32 || ARCH >= 80, "TF32 needs sm_80");
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

    extern __shared__ __align__(16) unsigned char smem[];
    using bits = typename E::bits;
    bits* Qs = reinterpret_cast<bits*>(smem);   // [BR][DP]
    bits* Ks = Qs + BR * DP;                    // [BC][DP]
    bits* Vs = Ks + BC * DP;                    // [BC][DP]

    const float neg_inf = __int_as_float(0xff800000);
    // Scores are kept raw and the scale folds into the exponent's FMA; with score mods they are
    // turned into the log2 domain one by one instead (fa_mask.cuh, score_mod), so the factor is 1.
    const float sl2 = MASK == FA_MODS ? 1.f : fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    // Masked: later Q tiles see more keys (causal); fa_block launches them first, so the tail is short.
    const fa_block blk = fa_block::of<MASK>();
    const int row0 = blk.tile * BR;
    const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
    const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d), o_vec = vec_ok(O, o_sb, o_sh, o_sn, d);
    // This lane's ldmatrix row addresses (bytes, shared space) for the A operand from Qi, the
    // B operand from Kj (rows are keys) and from Vj (transposed: rows are keys, B wants d).
    // In bytes the patterns are the same for 16-bit and fp32 elements (a k-step is 32 bytes).
    const unsigned q_lane = smem_addr(Qs) + (warp * WR + lane % 16) * ROW + lane / 16 * 16;
    const unsigned k_lane = smem_addr(Ks) + (lane % 8 + lane / 16 * 8) * ROW + lane / 8 % 2 * 16;
    const unsigned v_lane = smem_addr(Vs) + (lane % 8 + lane / 8 % 2 * 8) * ROW + lane / 16 * 16;
    // fp32 V cannot be transposed by ldmatrix (16-bit only): B fragments come as scalars, keys
    // 2t and 2t + 1 of each 8 (the order Pij's accumulators hold them in), column g.
    const float* v_f32 = reinterpret_cast<const float*>(Vs) + 2 * t * DP + g;

    // Grid-stride over (batch, head) from the block's first: gridDim.y/z are capped at 65535 by the planner.
    for (int b = blk.b; b < B; b += gridDim.z)
    for (int h = blk.h; h < H; h += gridDim.y) {
        const fa_seq sq = fa_seq::of(b, row0, Nq, Nk, cu_q, cu_k);
        if (sq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
        const int rows = min(BR, sq.rows), nk = sq.nk;
        const fa_window win = fa_window::of(sq, win_left, win_right);
        int j0 = 0, j1 = (nk + BC - 1) / BC;   // the key tiles some row of this Q tile sees
        if (MASK) win.tiles(row0, rows, BC, j0, j1);
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;
        const T* Qbh = Q + b * q_sb + h * q_sh + (sq.q0 + row0) * q_sn;
        const T* Kbh = K + b * k_sb + (h / group) * k_sh + sq.k0 * k_sn;   // GQA: group q heads a k/v head
        const T* Vbh = V + b * v_sb + (h / group) * v_sh + sq.k0 * v_sn;

        // Line 4: Qi, and K(j0) behind it.
        load_tile<T, BR, D, DP, NT, ARCH>(Qs, Qbh, q_sn, rows, d, q_vec);
        if (j0 < j1) load_tile<T, BC, D, DP, NT, ARCH>(Ks, Kbh + (long long)j0 * BC * k_sn, k_sn, nk - j0 * BC, d, k_vec);
        if constexpr (ARCH >= 80) { cp_async_commit(); cp_async_wait_all(); }
        __syncthreads();
        if (scale < 0.f) {   // s * scale = (-s) * |scale|: negate Qi (sign bits) once
            constexpr unsigned SIGNS = F32 ? 0x80000000u : 0x80008000u;
            for (int i = threadIdx.x; i < BR * ROW / 4; i += NT) reinterpret_cast<unsigned*>(Qs)[i] ^= SIGNS;
            __syncthreads();
        }

        float o[MT][ND][4] = {};                      // line 5: Oi = 0, mi = -inf, li = 0
        float m[MT][2], l[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = neg_inf, l[mt][0] = l[mt][1] = 0.f;

        for (int j = j0; j < j1; ++j) {   // line 6
            const int col0 = j * BC;
            if constexpr (ARCH >= 80) cp_async_wait_all();
            __syncthreads();   // Kj has landed; every warp is done with V(j-1)
            // Line 7 (V half): Vj streams in during Sij = Qi Kj^T.
            load_tile<T, BC, D, DP, NT, ARCH>(Vs, Vbh + col0 * v_sn, v_sn, nk - col0, d, v_vec);
            if constexpr (ARCH >= 80) cp_async_commit();

            // Line 8: Sij = Qi Kj^T (Qi fragments from shared memory, both m-tiles per Kj
            // fragment), over k-steps [k0, k1) into acc.
            auto qk_steps = [&](float (&acc)[MT][NS][4], int k0, int k1) {
#pragma unroll
                for (int kk = k0; kk < k1; ++kk) {
                    // Qi's fragments are read again each step: holding them in registers (D = 64)
                    // cost 50 registers a thread and 10% of the speed on an H100.
                    operand<4> qa[MT];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        ldmatrix_x4<false>(qa[mt].hi, q_lane + mt * 16 * ROW + kk * 32);
                        make_operand<T, PASSES>(qa[mt]);
                    }
#pragma unroll
                    for (int p = 0; p < NS / 2; ++p) {
                        operand<4> kb;   // B operands of key tiles 2p (registers 0, 1) and 2p + 1 (2, 3)
                        ldmatrix_x4<false>(kb.hi, k_lane + p * 16 * ROW + kk * 32);
                        make_operand<T, PASSES>(kb);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_op<T, ARCH, PASSES>(acc[mt][2 * p], qa[mt], kb, 0);
                            mma_op<T, ARCH, PASSES>(acc[mt][2 * p + 1], qa[mt], kb, 2);
                        }
                    }
                }
            };
            float s[MT][NS][4] = {};
            if constexpr (KG == KS) {
                qk_steps(s, 0, KS);
            } else {   // 3xTF32: groups of KG k-steps into fresh accumulators, summed rounding to nearest
#pragma unroll
                for (int k0 = 0; k0 < KS; k0 += KG) {
                    float part[MT][NS][4] = {};
                    qk_steps(part, k0, k0 + KG);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                            for (int e = 0; e < 4; ++e) s[mt][nt][e] += part[mt][nt][e];
                }
            }
            // Score mods and the mask (fa_softmax.cuh) on this warp's rows.
            mask_scores<MT, NS, MASK>(s, win, row0 + warp * WR, col0, nk, scale, softcap, slope);

            if constexpr (ARCH >= 80) cp_async_wait_all();
            __syncthreads();   // Vj has landed; every warp is done with Kj
            if (j + 1 < j1) {  // line 7 (K half) of the next step, during Pij Vj
                load_tile<T, BC, D, DP, NT, ARCH>(Ks, Kbh + (col0 + BC) * k_sn, k_sn, nk - col0 - BC, d, k_vec);
                if constexpr (ARCH >= 80) cp_async_commit();
            }

            // Lines 9-10's row work (fa_softmax.cuh): Pij, mi, li, and diag(alpha) Oi.
            float alpha[MT][2];
            bool moved = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) moved |= softmax_rows<NS>(s[mt], m[mt], l[mt], alpha[mt], sl2);
            if (__any_sync(0xffffffffu, moved))
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) rescale_rows<ND>(o[mt], alpha[mt]);

            // Line 10: Oi += Pij Vj, Pij rounded to the MMA's input type as the A operand
            // (accumulators -> A fragments). 16-bit: a k-step is 16 keys (two Sij tiles) and
            // ldmatrix.trans gives Vj's B fragments; fp32: a k-step is one 8-key Sij tile whose
            // accumulator columns 2t, 2t + 1 serve as A columns t, t + 4, with Vj rows to match.
            if constexpr (!F32) {
#pragma unroll
                for (int kk = 0; kk < BC / 16; ++kk) {
                    operand<4> pa[MT];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) p_fragment<T, ARCH, NS>(pa[mt].hi, s[mt], kk);
#pragma unroll
                    for (int p = 0; p < D / 16; ++p) {
                        operand<4> vb;   // d tiles 2p (registers 0, 1) and 2p + 1 (2, 3)
                        ldmatrix_x4<true>(vb.hi, v_lane + kk * 16 * ROW + p * 32);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_op<T, ARCH, PASSES>(o[mt][2 * p], pa[mt], vb, 0);
                            mma_op<T, ARCH, PASSES>(o[mt][2 * p + 1], pa[mt], vb, 2);
                        }
                    }
                }
            } else {
                // 3xTF32: each tile's products go to fresh accumulators, added to Oi rounding to
                // nearest (DCH column tiles at a time, to bound the registers): one accumulator
                // over all Nk / 8 MMAs gathers their truncation, 2e-4 relative at Nk = 4096.
                // TF32's operand rounding (2^-11) dwarfs that: it accumulates into Oi directly.
                auto pv_steps = [&](float (&acc)[MT][DCH][4], int dc) {   // acc: Oi's tiles dc..
#pragma unroll
                    for (int kt = 0; kt < NS; ++kt) {
                        operand<4> pa[MT];
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) pa[mt] = p_operand<T, PASSES>(s[mt][kt]);   // finite
#pragma unroll
                        for (int dt = 0; dt < DCH && dc + dt < ND; ++dt) {
                            operand<2> vb;
                            vb.hi[0] = __float_as_uint(v_f32[kt * 8 * DP + (dc + dt) * 8]);
                            vb.hi[1] = __float_as_uint(v_f32[(kt * 8 + 1) * DP + (dc + dt) * 8]);
                            make_operand<T, PASSES>(vb);
#pragma unroll
                            for (int mt = 0; mt < MT; ++mt)
                                mma_op<T, ARCH, PASSES>(acc[mt][dt], pa[mt], vb, 0);
                        }
                    }
                };
                if constexpr (PASSES == 1) {
                    pv_steps(o, 0);   // DCH == ND
                } else {
#pragma unroll
                    for (int dc = 0; dc < ND; dc += DCH) {
                        float part[MT][DCH][4] = {};
                        pv_steps(part, dc);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                            for (int dt = 0; dt < DCH && dc + dt < ND; ++dt)
#pragma unroll
                                for (int e = 0; e < 4; ++e) o[mt][dc + dt][e] += part[mt][dt][e];
                    }
                }
            }
        }

        // Lines 12-15: Oi / li, Li = mi + log(li) (natural log). A row with every key masked
        // has li = 0: O = 0, L = -inf. O goes out through this warp's own rows of Qs (only this
        // warp ever read them), so the global stores are whole 16-byte chunks.
        bits* Ow = Qs + warp * WR * DP;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
            l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
            const bool none = l[mt][r] == 0.f;   // every key masked: O = 0 chosen, not 0 * (o = NaN)
            const float inv = 1.f / l[mt][r];
#pragma unroll
            for (int dt = 0; dt < ND; ++dt) {
                bits* dst = Ow + (mt * 16 + g + 8 * r) * DP + dt * 8 + 2 * t;
                const float lo = none ? 0.f : o[mt][dt][2 * r] * inv;
                const float hi = none ? 0.f : o[mt][dt][2 * r + 1] * inv;
                if constexpr (F32)
                    *reinterpret_cast<fa_f2*>(dst) = fa_f2{lo, hi};
                else
                    *reinterpret_cast<unsigned*>(dst) = pack2<T, ARCH>(lo, hi);
            }
        }
        __syncwarp();
        const long long q0 = fa_seq::first_row(b, cu_q);   // read again: no register held for it
        T* Obh = O + b * o_sb + h * o_sh + (q0 + row0) * o_sn;
        constexpr int CH = D / E::VEC;   // 16-byte chunks a row
        for (int i = lane; i < WR * CH; i += 32) {
            const int r = warp * WR + i / CH, c = i % CH * E::VEC;
            if (r >= rows || c >= d) continue;
            const bits* src = Ow + (i / CH) * DP + c;
            T* dst = Obh + r * o_sn + c;
            if (o_vec) {
                *reinterpret_cast<fa_u128*>(dst) = *reinterpret_cast<const fa_u128*>(src);
            } else {
                for (int e = 0; e < E::VEC && c + e < d; ++e) E::set(dst[e], src[e]);
            }
        }
        if (t == 0) {
            float* Lbh = L + b * l_sb + h * l_sh + q0 + row0;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = warp * WR + mt * 16 + g + 8 * r;
                if (row < rows) Lbh[row] = l[mt][r] == 0.f ? neg_inf : m[mt][r] * LN2 + logf(l[mt][r]);
            }
        }
        __syncthreads();   // smem is reused by the next (batch, head)
    }
}
